"""Amphibia, the host side: build apps into components, run them sandboxed, serve them and their models."""

__version__ = "0.1.0"

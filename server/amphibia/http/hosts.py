"""Which Host headers the gateway answers (`[server] hosts`): the guard against DNS rebinding."""
from __future__ import annotations

import logging
from typing import Sequence

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import BadHost, error_response

log = logging.getLogger("amphibia.gateway")


def host_name(header: str) -> str:
    """The host of a Host header (or a `hosts` entry), without port or brackets:
    'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    if header.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        header = header.split(":")[0]
    return header.rstrip(".")


class TrustedHosts:
    """Refuses (400 `bad_host`) a request or WebSocket whose Host header names none of `hosts`.

    Why: with DNS rebinding, a page on evil.example whose name then resolves to 127.0.0.1 is, to
    the browser, same-origin with this gateway; only the Host header still says evil.example. The
    port is ignored; "*" allows any host, "*.example.com" its subdomains. The address the connection
    arrived at is always allowed (an IP literal cannot be rebound), so `--host 10.0.0.5` or a
    gateway on 0.0.0.0 reached by its IP works without listing it. Unlike Starlette's
    TrustedHostMiddleware it answers in the project's JSON error shape and understands `[::1]:8000`.
    """

    def __init__(self, app: ASGIApp, hosts: Sequence[str]) -> None:
        self.app = app
        self.any = "*" in hosts
        self.names = {host_name(h) for h in hosts if not h.startswith("*.")}
        self.suffixes = tuple(h.lower()[1:] for h in hosts if h.startswith("*."))  # ".example.com"

    def allows(self, host: str, local_address: str | None = None) -> bool:
        return (self.any or host in self.names or host == local_address
                or (bool(self.suffixes) and host.endswith(self.suffixes)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = host_name(Headers(scope=scope).get("host", ""))
        server = scope.get("server")
        if self.allows(host, host_name(str(server[0])) if server else None):
            await self.app(scope, receive, send)
            return
        log.warning("refused %s %s for host %r: not in [server] hosts", scope["type"], scope.get("path", ""), host)
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": "bad host"})
            return
        error = BadHost(f"this gateway does not serve host {host!r}; add it to [server] hosts in amphibia.toml")
        await error_response(error)(scope, receive, send)

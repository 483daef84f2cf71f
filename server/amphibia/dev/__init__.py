"""`amphibia dev`: an app's source running in the page (Pyodide), saved from the page, watched on disk.

`bundle` is what the page's Pyodide gets (the app's files, the guest SDK, the WIT bindings' types),
`compat` says what the page copy or the component lacks, `files` writes what the page saves.
"""

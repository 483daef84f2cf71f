"""Where apps run on the server: wasmtime components in a fresh sandbox per request (`runtime`), and the
host capabilities they import (`llm_host`), each its own unit behind `capability.HostCapability`."""

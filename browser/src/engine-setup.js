// The engine router for one app instance, built the same way wherever it lives: in the guest's
// Worker (JSPI build) or in the engine Worker beside it (sync build).
import { EchoEngine, EngineRouter, RemoteEngine } from "./engines.js";
import { LocalEngine, localUnavailable } from "./local.js";

export function createRouter(config, post) {
  const bridgeUrl = async () => {
    // A fresh token per connection: tokens are short-lived, and a reconnect may come much later.
    const res = await fetch(`${config.gateway}/bridge/token?app=${encodeURIComponent(config.app)}`);
    if (!res.ok) throw new Error(`bridge token refused: ${res.status} ${await res.text()}`);
    const { token } = await res.json();
    return `${config.gateway.replace(/^http/, "ws")}/bridge?token=${encodeURIComponent(token)}`;
  };
  const onToken = (text) => post("token", { text });
  if (config.engine === "echo") {
    const router = new EngineRouter(Object.assign(new EchoEngine(), { onToken }), "remote", post);
    router.decide("echo", "the page asked for the echo engine (no model: measures call overhead)");
    return router;
  }
  const router = new EngineRouter(new RemoteEngine(bridgeUrl, onToken), config.engine, post);
  const unavailable = config.forceLocalUnavailable
    ? `the page forced it off (${config.forceLocalUnavailable})`
    : localUnavailable(config.localModel, config.maxLocalModelBytes);
  router.startLocal(() => new LocalEngine(config.localModel, { wasmUrl: config.wllamaWasm }), unavailable);
  return router;
}

/** Control operations a page may send about its engines (over its MessagePort). */
export function controlOps(router) {
  return {
    localReady: () => router.localReady,
    useEngine: (policy) => router.use(policy),
    stopLocal: async (reason) => { await router.stopLocal(reason || "the page stopped the local engine"); return router.current; },
    dropBridge: async () => { router.remote.dropConnection?.(); return true; },
  };
}

/** Serve `ops` on `port`: requests {id, op, args}, replies {id, result | error}; events {event, detail}. */
export function serve(port, ops) {
  port.onmessage = async ({ data }) => {
    try {
      port.postMessage({ id: data.id, result: await ops[data.op](data.args) });
    } catch (err) {
      port.postMessage({ id: data.id, error: { message: String(err?.message ?? err), payload: err?.payload } });
    }
  };
}

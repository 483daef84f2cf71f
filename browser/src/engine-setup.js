// The engine router for one app instance, built the same way wherever it lives: in the guest's
// Worker (JSPI build) or in the engine Worker beside it (sync build).
import { EchoEngine, EngineRouter, RemoteEngine, llmImports } from "./engines.js";
import { LocalEngine, localUnavailable } from "./local.js";
import { startEngineWorker, syncLlmImports } from "./sync.js";

/** The guest's `llm` imports in an app's Worker, and the engine decision so far. With JSPI the router
 * lives in this Worker and the imports are async; without, it lives in an engine Worker beside it
 * and the imports block on Atomics (which needs a cross-origin isolated page). Sets `config.mode`. */
export async function guestLlm(config, port) {
  const jspi = typeof WebAssembly.Suspending === "function";
  config.mode = config.mode ?? (jspi ? "jspi" : "sync");
  if (config.mode === "jspi") {
    if (!jspi) throw new Error("this browser lacks JSPI (WebAssembly.Suspending); use mode \"sync\"");
    const router = createRouter(config, (event, detail) => port.postMessage({ event, detail }));
    serve(port, controlOps(router));
    return { llm: llmImports(router), current: router.current };
  }
  if (!self.crossOriginIsolated) {
    throw new Error("this browser lacks JSPI, and the sync fallback needs a cross-origin isolated page "
      + "(COOP/COEP, as the gateway's /apps/NAME/browser/ and /dev/ pages are)");
  }
  const channel = await startEngineWorker(config, port);
  return { llm: syncLlmImports(channel), current: channel.request({ op: "hello" }) };
}

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

// The app's home in the browser: a module Worker that instantiates the jco build (JSPI) and answers
// its `llm` imports through the engine router (local wllama, the remote bridge, or both).
import { EchoEngine, EngineRouter, RemoteEngine, llmImports, wasiImports } from "./engines.js";
import { LocalEngine, localUnavailable } from "./local.js";

let config = null;
let instance = null;
let router = null;
let turn = Promise.resolve(); // one call at a time: a component instance is not reentrant
const compiled = new Map(); // core module path -> WebAssembly.Module, compiled once per worker

const timings = {};
const mark = (name, since) => { timings[name] = Math.round(performance.now() - since); return performance.now(); };

async function instantiate() {
  let t = performance.now();
  const [mod, shim] = await Promise.all([import(`${config.base}app.js`), import(config.shim)]);
  t = mark("import_ms", t);
  const imports = {
    ...wasiImports(shim),
    "amphibia:ai/llm": llmImports(router),
    "amphibia:ai/http": {},
  };
  const getCoreModule = (path) => {
    if (!compiled.has(path)) compiled.set(path, compile(path));
    return compiled.get(path);
  };
  const instance = await mod.instantiate(getCoreModule, imports);
  mark("compile_and_instantiate_ms", t);
  return instance;
}

function compile(path) {
  const started = performance.now();
  return WebAssembly.compileStreaming(fetch(`${config.base}${path}`)).then((module) => {
    timings.compile_ms = Math.max(timings.compile_ms ?? 0, Math.round(performance.now() - started));
    return module;
  });
}

const post = (event, detail) => self.postMessage({ event, detail });

async function bridgeUrl() {
  // A fresh token per connection: tokens are short-lived, and a reconnect may come much later.
  const res = await fetch(`${config.gateway}/bridge/token?app=${encodeURIComponent(config.app)}`);
  if (!res.ok) throw new Error(`bridge token refused: ${res.status} ${await res.text()}`);
  const { token } = await res.json();
  return `${config.gateway.replace(/^http/, "ws")}/bridge?token=${encodeURIComponent(token)}`;
}

const ops = {
  async init(args) {
    config = args;
    // Compile the core modules while the generated JS and the shim load (they are most of ready).
    for (const path of config.coreWasm ?? []) compiled.set(path, compile(path));
    if (typeof WebAssembly.Suspending !== "function") {
      throw new Error("this browser lacks JSPI (WebAssembly.Suspending); use the sync build (mode: \"sync\")");
    }
    const remote = new RemoteEngine(bridgeUrl, (text) => post("token", { text }));
    if (config.engine === "echo") {
      router = new EngineRouter(new EchoEngine(), "remote", post);
      router.remote.onToken = (text) => post("token", { text });
      router.decide("echo", "the page asked for the echo engine (no model: measures call overhead)");
    } else {
      router = new EngineRouter(remote, config.engine, post);
      const unavailable = config.forceLocalUnavailable
        ? `the page forced it off (${config.forceLocalUnavailable})`
        : localUnavailable(config.localModel, config.maxLocalModelBytes);
      router.startLocal(() => new LocalEngine(config.localModel, { wasmUrl: config.wllamaWasm }), unavailable);
    }
    instance = await instantiate();
    return { ...router.current, jspi: true, crossOriginIsolated: self.crossOriginIsolated, timings };
  },
  async localReady() {
    return router.localReady;
  },
  async useEngine(policy) {
    return router.use(policy);
  },
  async stopLocal(reason) {
    await router.stopLocal(reason || "the page stopped the local engine");
    return router.current;
  },
  async dropBridge() {
    router.remote.dropConnection?.();
    return true;
  },
  async handle(req) {
    const run = async () => {
      try {
        const res = await instance.handle(req);
        return { status: res.status, headers: res.headers, body: res.body };
      } catch (err) {
        instance = await instantiate(); // a trapped instance is unusable: start a fresh one
        throw err;
      }
    };
    const result = turn.then(run);
    turn = result.catch(() => {});
    return result;
  },
};

self.onmessage = async ({ data }) => {
  try {
    self.postMessage({ id: data.id, result: await ops[data.op](data.args) });
  } catch (err) {
    self.postMessage({ id: data.id, error: { message: String(err?.message ?? err), payload: err?.payload } });
  }
};

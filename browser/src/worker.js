// The app's home in the browser: a module Worker that instantiates the jco build (JSPI) and answers
// its `llm` imports through the remote engine.
import { RemoteEngine, wasiImports, llmImports } from "./engines.js";

let config = null;
let instance = null;
let engine = null;

async function instantiate() {
  const mod = await import(`${config.base}app.js`);
  const shim = await import(config.shim);
  const imports = {
    ...wasiImports(shim),
    "amphibia:ai/llm": llmImports(engine),
    "amphibia:ai/http": {},
  };
  const getCoreModule = (path) => WebAssembly.compileStreaming(fetch(`${config.base}${path}`));
  return mod.instantiate(getCoreModule, imports);
}

const ops = {
  async init(args) {
    config = args;
    if (typeof WebAssembly.Suspending !== "function") {
      throw new Error("this browser lacks JSPI (WebAssembly.Suspending); the sync fallback is not built yet");
    }
    engine = new RemoteEngine(config.bridge, (text) => self.postMessage({ event: "token", detail: { text } }));
    instance = await instantiate();
    const reason = "the shared pool over the bridge (no local engine in this build)";
    self.postMessage({ event: "engine", detail: { engine: "remote", reason } });
    return { engine: "remote", reason, jspi: true };
  },
  async handle(req) {
    try {
      const res = await instance.handle(req);
      return { status: res.status, headers: res.headers, body: res.body };
    } catch (err) {
      instance = await instantiate(); // a trapped instance is unusable: start a fresh one
      throw err;
    }
  },
};

self.onmessage = async ({ data }) => {
  try {
    self.postMessage({ id: data.id, result: await ops[data.op](data.args) });
  } catch (err) {
    self.postMessage({ id: data.id, error: { message: String(err?.message ?? err), payload: err?.payload } });
  }
};

// The app's home in the browser: a module Worker that instantiates the app's jco build and answers
// its `llm` imports. With JSPI (the default) the imports are async functions and the engine router
// (local wllama, the remote bridge, or both) lives here; without JSPI the sync build runs here and
// blocks on an engine Worker beside it (sync.js). Engine events and controls travel on the page's
// MessagePort; `handle` calls on this Worker's own messages.
import { wasiImports } from "./engines.js";
import { guestLlm } from "./engine-setup.js";

let config = null;
let instance = null;
let llm = null;
let turn = Promise.resolve(); // one call at a time: a component instance is not reentrant
const compiled = new Map(); // core module path -> WebAssembly.Module, compiled once per worker
const timings = {};
const mark = (name, since) => { timings[name] = Math.round(performance.now() - since); return performance.now(); };

function compile(path) {
  const started = performance.now();
  return WebAssembly.compileStreaming(fetch(`${config.base}${path}`)).then((module) => {
    timings.compile_ms = Math.max(timings.compile_ms ?? 0, Math.round(performance.now() - started));
    return module;
  });
}

async function instantiate() {
  let t = performance.now();
  const script = config.mode === "sync" ? "app.sync.js" : "app.js";
  const [mod, shim] = await Promise.all([import(`${config.base}${script}`), import(config.shim)]);
  t = mark("import_ms", t);
  const imports = { ...wasiImports(shim), "amphibia:ai/llm": llm, "amphibia:ai/http": {},
                    "amphibia:ai/response-stream": responseStream };
  const getCoreModule = (path) => {
    if (!compiled.has(path)) compiled.set(path, compile(path));
    return compiled.get(path);
  };
  const result = await mod.instantiate(getCoreModule, imports);
  mark("compile_and_instantiate_ms", t);
  return result;
}

// A streamed answer (the app's `response-stream` imports): status and headers, then each piece, go
// to the page as they come, tagged with the `handle` call they belong to (one call runs at a time).
let answering = null; // { id, started } of the `handle` call running now
const responseStream = {
  start(status, headers) {
    if (!answering || answering.started) throw new Error("start outside a request, or twice");
    answering.started = true;
    self.postMessage({ stream: answering.id, head: { status, headers } });
  },
  write(chunk) {
    if (!answering?.started) throw new Error("write before start");
    const copy = chunk.slice(); // the guest's memory is not ours to hand over
    self.postMessage({ stream: answering.id, chunk: copy }, [copy.buffer]);
  },
};

const ops = {
  async init(args, port) {
    config = args;
    // Compile the core modules while the generated JS and the shim load (they are most of ready).
    for (const path of config.coreWasm ?? []) compiled.set(path, compile(path));
    let current;
    ({ llm, current } = await guestLlm(config, port));
    instance = await instantiate();
    return { ...current, mode: config.mode, crossOriginIsolated: self.crossOriginIsolated, timings };
  },
  async handle(req, _port, id) {
    const run = async () => {
      answering = { id, started: false };
      try {
        const res = await instance.handle(req);
        return { status: res.status, headers: res.headers, body: res.body, streamed: answering.started };
      } catch (err) {
        instance = await instantiate(); // a trapped instance is unusable: start a fresh one
        throw err;
      } finally {
        answering = null;
      }
    };
    const result = turn.then(run);
    turn = result.catch(() => {});
    return result;
  },
};

self.onmessage = async ({ data }) => {
  try {
    self.postMessage({ id: data.id, result: await ops[data.op](data.args, data.port, data.id) });
  } catch (err) {
    self.postMessage({ id: data.id, error: { message: String(err?.message ?? err), payload: err?.payload } });
  }
};

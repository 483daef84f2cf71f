// An app's source running in Pyodide (`amphibia dev`): the same Worker protocol as worker.js (init,
// handle; engine events on the page's MessagePort), plus `load` for new source. The app imports the
// real amphibia_guest SDK; its `llm` calls reach the same engines as the compiled build (local
// wllama, the bridge, or both): with JSPI through `run_sync`, else blocking on an engine Worker with
// Atomics (sync.js). Python's output and the app's tracebacks go to the page as "log" events.
import { guestLlm } from "./engine-setup.js";

const LIB = "/lib/amphibia"; // the SDK, the world's bindings and the host module
let config = null;
let py = null;
let host = null; // the Python module amphibia_pyodide
let appDir = null;
let written = []; // the app's files in Pyodide's file system, removed before the next load
let turn = Promise.resolve(); // one call at a time, as in a component instance
let answering = null; // { id, started } of the `handle` call running now
let post = () => {};
const timings = {};

function writeFiles(root, files) {
  const paths = [];
  for (const [rel, text] of Object.entries(files)) {
    const path = `${root}/${rel}`;
    py.FS.mkdirTree(path.slice(0, path.lastIndexOf("/")));
    py.FS.writeFile(path, text);
    paths.push(path);
  }
  return paths;
}

async function load(files) {
  for (const path of written) { try { py.FS.unlink(path); } catch {} }
  written = writeFiles(appDir, files);
  const started = performance.now();
  // An app may call `llm` while it imports: under JSPI that must be a promising call too.
  const result = config.mode === "jspi" ? await host.load.callPromising(appDir) : host.load(appDir);
  const error = result ?? null; // the host module answers with JS values (to_js)
  const ms = performance.now() - started;
  if (error) post("log", { stream: "stderr", text: error.text });
  return { ok: !error, error, load_ms: Math.round(ms * 10) / 10 };
}

const streamImports = {
  stream_start(status, headers) {
    if (!answering || answering.started) throw new Error("start outside a request, or twice");
    answering.started = true;
    self.postMessage({ stream: answering.id, head: { status, headers: headers.toJs ? headers.toJs() : headers } });
  },
  stream_write(chunk) {
    if (!answering?.started) throw new Error("write before start");
    const copy = (chunk.toJs ? chunk.toJs() : chunk).slice();
    self.postMessage({ stream: answering.id, chunk: copy }, [copy.buffer]);
  },
  dispose(stream) { stream[Symbol.dispose ?? Symbol.for("dispose")](); },
};

const ops = {
  async init(args, port) {
    config = args;
    let t = performance.now();
    const { loadPyodide } = await import(`${config.pyodide}pyodide.mjs`);
    const pyodideReady = loadPyodide({
      indexURL: config.pyodide,
      stdout: (text) => post("log", { stream: "stdout", text }),
      stderr: (text) => post("log", { stream: "stderr", text }),
    });
    const bundle = config.bundle; // from the gateway's /dev/apps/NAME/bundle: files, SDK, bindings
    delete config.bundle;
    const hostSource = await fetch(new URL("./python/amphibia_pyodide.py", import.meta.url)).then((r) => r.text());
    post = (event, detail) => port.postMessage({ event, detail });
    const { llm, current } = await guestLlm(config, port);
    py = await pyodideReady;
    t = mark("pyodide_ms", t);
    // The page's Stop: it writes SIGINT (2) here and Python raises KeyboardInterrupt at its next
    // bytecode (a shared buffer, so only in a cross-origin isolated page, as the dev page is).
    if (config.interrupt) py.setInterruptBuffer(config.interrupt);
    writeFiles(LIB, { ...bundle.sdk, ...bundle.bindings, "amphibia_pyodide.py": hostSource });
    py.registerJsModule("amphibia_js", { llm, ...streamImports });
    py.runPython(`import sys\nsys.dont_write_bytecode = True\nsys.path.insert(0, ${JSON.stringify(LIB)})`);
    host = py.pyimport("amphibia_pyodide");
    appDir = `/apps/${config.app}`;
    const loaded = await load(bundle.files);
    const missing = host.missing(bundle.stdlib);
    mark("load_ms", t);
    return { ...current, mode: config.mode, crossOriginIsolated: self.crossOriginIsolated, timings,
             loaded, version: bundle.version, missing, pyodide: py.version };
  },
  async load(files) {
    const result = turn.then(() => load(files)); // a request in flight finishes on the source it started with
    turn = result.catch(() => {});
    return result;
  },
  async missing(modules) {
    return host.missing(modules);
  },
  async handle(req, _port, id) {
    const run = async () => {
      answering = { id, started: false };
      if (config.interrupt) config.interrupt[0] = 0; // a Stop meant for an earlier request
      try {
        const request = { ...req, body: new Uint8Array(req.body) };
        const res = config.mode === "jspi" ? await host.handle.callPromising(request) : host.handle(request);
        const out = res;
        return { status: out.status, headers: out.headers, body: out.body, streamed: answering.started,
                 loadError: out.loadError ?? false };
      } finally {
        answering = null;
      }
    };
    const result = turn.then(run);
    turn = result.catch(() => {});
    return result;
  },
};

function mark(name, since) {
  timings[name] = Math.round(performance.now() - since);
  return performance.now();
}

self.onmessage = async ({ data }) => {
  try {
    self.postMessage({ id: data.id, result: await ops[data.op](data.args, data.port, data.id) });
  } catch (err) {
    self.postMessage({ id: data.id, error: { message: String(err?.message ?? err), payload: err?.payload } });
  }
};

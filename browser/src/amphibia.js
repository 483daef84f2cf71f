// Amphibia in the page: load an app and call it. The app itself runs in a module Worker.
//
//   import { load } from "/amphibia/amphibia.js";
//   const app = await load("/apps/chat/");
//   const res = await app.handle({ method: "POST", path: "/", body: "Hi" });
//
// Its llm calls run on this device (wllama) when it can, else on the gateway's pool over the
// /bridge WebSocket; events "engine" and "fallback" say which and why, "token" streams text.

export async function load(appUrl, options = {}) {
  const url = new URL(appUrl, location.href);
  const name = url.pathname.split("/").filter(Boolean)[1];
  if (!name) throw new Error(`not an app URL: ${appUrl}`);
  const gateway = url.origin;
  if (options.runtime === "pyodide") return loadSource(name, gateway, options);
  const worker = startWorker(); // its modules load while the app list is fetched
  const listing = await (await fetch(`${gateway}/api/apps`)).json();
  const info = listing.apps.find((a) => a.name === name);
  if (!info || !info.browser) {
    worker.terminate();
    throw new Error(info ? `app ${name} has no browser build` : `no app named ${name} at ${gateway}`);
  }
  const app = new App(name, worker, {
    ...engineConfig(name, gateway, info, listing.max_local_model_bytes, options),
    coreWasm: info.core_wasm,
    base: new URL(info.browser, gateway).href,
    shim: new URL("/amphibia/shim/index.js", gateway).href,
  });
  await app.ready;
  return app;
}

/** What a Worker needs to set up the app's engines, from the gateway's view of the app (`info`: its
 * `/api/apps` entry, or the dev bundle) and the page's options. */
function engineConfig(name, gateway, info, maxLocalModelBytes, options) {
  const abs = (path) => new URL(path, gateway).href;
  return {
    app: name,
    gateway,
    wllamaWasm: abs("/amphibia/wllama/wasm/wllama.wasm"),
    // The app's policy (its app.toml), unless the page says otherwise: local | remote | auto | echo.
    engine: options.engine ?? info.engine ?? "auto",
    localModel: info.local_model ? { ...info.local_model, url: abs(info.local_model.url) } : null,
    maxLocalModelBytes: options.maxLocalModelBytes ?? maxLocalModelBytes,
    forceLocalUnavailable: options.forceLocalUnavailable ?? null,
    mode: options.mode ?? null, // null: JSPI where the browser has it, else the sync path
  };
}

/** The app's source instead of its build (`amphibia dev`): Python in Pyodide, in a Worker, with the
 * real SDK and the same engines. `options.bundle` (the gateway's /dev/apps/NAME/bundle) saves a fetch.
 * The returned App also has `reload(files)`, `loaded` (the import's error, if any) and `missing`. */
async function loadSource(name, gateway, options) {
  const worker = startWorker("./pyodide-worker.js");
  let bundle = options.bundle;
  if (!bundle) {
    const res = await fetch(`${gateway}/dev/apps/${encodeURIComponent(name)}/bundle`, { cache: "no-store" });
    if (!res.ok) { worker.terminate(); throw new Error(`no source for ${name}: ${res.status} ${await res.text()}`); }
    bundle = await res.json();
  }
  const app = new App(name, worker, {
    ...engineConfig(name, gateway, bundle, bundle.max_local_model_bytes, options),
    bundle,
    pyodide: new URL("/amphibia/pyodide/", gateway).href,
    // Shared with the Worker so that `interrupt()` reaches Python while it runs (isolated pages only).
    interrupt: self.crossOriginIsolated ? new Uint8Array(new SharedArrayBuffer(1)) : null,
  });
  await app.ready;
  return app;
}

/** A module Worker from the runtime's own origin, also when the page is on another origin
 * (a Worker's script must be same-origin: a tiny blob module imports the real one). */
function startWorker(script = "./worker.js") {
  const url = new URL(script, import.meta.url);
  if (url.origin === location.origin) return new Worker(url, { type: "module" });
  const blob = new Blob([`import ${JSON.stringify(url.href)};`], { type: "text/javascript" });
  return new Worker(URL.createObjectURL(blob), { type: "module" });
}

class App extends EventTarget {
  constructor(name, worker, config) {
    super();
    this.#worker = worker;
    this.name = name;
    this.engine = null;
    this.#config = config;
    this.ready = this.#start();
  }

  #config;
  #worker = null;
  #created = performance.now();
  #calls = new Map();
  #streams = new Map(); // handle call id -> where its streamed head and pieces go
  #nextId = 1;

  #control = null; // MessagePort to the engine router: its events, and controls such as stopLocal
  #controls = new Map();

  async #start() {
    const settle = (calls, data) => {
      const call = calls.get(data.id);
      if (!call) return;
      calls.delete(data.id);
      if (data.error) call.reject(Object.assign(new Error(data.error.message), data.error));
      else call.resolve(data.result);
    };
    this.#worker.onmessage = ({ data }) => {
      if (data.stream === undefined) {
        this.#streams.delete(data.id); // its answer is complete: no more pieces come for it
        return settle(this.#calls, data);
      }
      const sink = this.#streams.get(data.stream); // a streamed answer's head or piece
      if (data.head) sink?.head(data.head);
      else sink?.chunk(data.chunk);
    };
    this.#worker.onerror = (event) => {
      for (const call of this.#calls.values()) call.reject(new Error(event.message || "worker failed"));
      this.#calls.clear();
    };
    const channel = new MessageChannel();
    this.#control = channel.port1;
    this.#control.onmessage = ({ data }) => {
      if (!data.event) return settle(this.#controls, data);
      // "engine" (which engine answers, and why), "fallback" (a rescue), "token" (streamed text)
      if (data.event === "engine") { this.engine = data.detail.engine; this.reason = data.detail.reason; }
      this.dispatchEvent(new CustomEvent(data.event, { detail: data.detail }));
    };
    const info = await this.#rpc("init", this.#config, channel.port2);
    this.engine = info.engine;
    this.reason = info.reason;
    this.mode = info.mode; // "jspi" or "sync" (SharedArrayBuffer + Atomics, for browsers without JSPI)
    this.crossOriginIsolated = info.crossOriginIsolated;
    this.timings = { ...info.timings, ready_ms: Math.round(performance.now() - this.#created) };
    // From source (Pyodide) only: the first import's result, the files' version, missing modules.
    this.loaded = info.loaded;
    this.version = info.version;
    this.missing = info.missing;
    this.pyodide = info.pyodide; // its version
    /** Resolves with the engine decision once the local model is loaded, or known to be unavailable. */
    this.localReady = this.#controlRpc("localReady");
  }

  /** A request on the Worker (`handle`, `init`) or on the control port; replies carry its id. */
  #request(target, calls, op, args, port, sink) {
    const id = this.#nextId++;
    if (sink) this.#streams.set(id, sink);
    return new Promise((resolve, reject) => {
      calls.set(id, { resolve, reject });
      target.postMessage({ id, op, args, port }, port ? [port] : []);
    });
  }

  #rpc(op, args, port) {
    return this.#request(this.#worker, this.#calls, op, args, port);
  }

  /** From source only: run these files ({path: text}) from now on; resolves with {ok, error, load_ms}
   * (error: {type, text, file, line}, the traceback cut to the app's frames). */
  reload(files) {
    return this.#rpc("load", files);
  }

  /** From source only: stop the Python code running now (KeyboardInterrupt: its request answers 500
   * with the traceback); false where the page is not cross-origin isolated and cannot. */
  interrupt() {
    if (!this.#config.interrupt) return false;
    this.#config.interrupt[0] = 2; // SIGINT
    return true;
  }

  /** From source only: which of these standard-library modules this Pyodide cannot find. */
  missingModules(modules) {
    return this.#rpc("missing", modules);
  }

  #controlRpc(op, args) {
    return this.#request(this.#control, this.#controls, op, args);
  }

  /** Override the app's policy from the page ("remote" stops a local engine; its answers in flight finish remotely). */
  useEngine(policy) {
    return this.#controlRpc("useEngine", policy);
  }

  /** Stop the local engine now (frees its memory); generations in flight finish on the bridge. */
  stopLocal(reason) {
    return this.#controlRpc("stopLocal", reason);
  }

  /** Drop the bridge connection as a network failure would; requests in flight resume on a new one. */
  dropBridge() {
    return this.#controlRpc("dropBridge");
  }

  /** Call the app's `handle` export; a guest that trapped is replaced by a fresh instance. A streamed
   * answer is collected whole here (`onChunk(bytes)` sees each piece as it comes); `fetch` streams it. */
  async handle({ method = "GET", path = "/", query = "", headers = {}, body = "" } = {}, { onHead, onChunk } = {}) {
    const bytes = typeof body === "string" ? new TextEncoder().encode(body) : new Uint8Array(body);
    let head = null;
    const pieces = [];
    const sink = {
      head: (h) => { head = h; onHead?.(h); },
      chunk: (c) => { pieces.push(c); onChunk?.(c); },
    };
    const args = { method, path, query, headers: Object.entries(headers), body: bytes };
    let res = await this.#request(this.#worker, this.#calls, "handle", args, undefined, sink);
    if (res.streamed && head) {
      const whole = new Uint8Array(pieces.reduce((n, p) => n + p.length, 0));
      pieces.reduce((at, p) => (whole.set(p, at), at + p.length), 0);
      res = { status: head.status, headers: head.headers, body: whole, streamed: true };
    }
    return { ...res, text: () => new TextDecoder().decode(res.body), json: () => JSON.parse(new TextDecoder().decode(res.body)) };
  }

  /** The same with the Fetch API's Request and Response: a streamed answer's body is a ReadableStream
   * that gets each piece as the app writes it. */
  async fetch(request) {
    const url = new URL(request.url, location.href);
    const args = {
      method: request.method, path: url.pathname, query: url.search.slice(1),
      headers: Object.fromEntries(request.headers), body: await request.arrayBuffer(),
    };
    return new Promise((resolve, reject) => {
      let controller = null;
      const body = new ReadableStream({ start: (c) => { controller = c; } });
      const done = this.handle(args, {
        onHead: (head) => resolve(new Response(body, { status: head.status, headers: head.headers })),
        onChunk: (chunk) => controller.enqueue(chunk),
      });
      done.then((res) => {
        if (res.streamed) controller.close();
        else resolve(new Response(res.body, { status: res.status, headers: res.headers }));
      }, (err) => { try { controller.error(err); } catch {} reject(err); });
    });
  }

  close() {
    this.#worker?.terminate();
    this.#control?.close();
  }
}

/** `<amphibia-app src="/apps/chat/">`: a default UI for an app running in this page. */
class AmphibiaAppElement extends HTMLElement {
  #app = null;
  #given = null;

  /** Show an App already loaded (the dev page's source in Pyodide) instead of loading `src`. */
  set app(app) { this.#given = app; }

  get app() { return this.#app ?? this.#given; }

  connectedCallback() {
    const root = this.attachShadow({ mode: "open" });
    root.innerHTML = `
      <style>
        :host { display: block; font: 15px/1.4 system-ui, sans-serif; border: 1px solid #cfdcd2; border-radius: 8px; padding: .8rem; }
        textarea { width: 100%; box-sizing: border-box; min-height: 3rem; font: inherit; }
        button { margin-top: .4rem; font: inherit; }
        pre { white-space: pre-wrap; background: #f3f7f4; padding: .5rem; min-height: 1.5rem; }
        .status { color: #5b6b60; font-size: .85rem; }
      </style>
      <textarea part="input" placeholder="Message"></textarea>
      <button part="send" disabled>Send</button>
      <pre part="output"></pre>
      <div class="status" part="status">loading…</div>`;
    const [input, send, output, status] = ["textarea", "button", "pre", ".status"].map((q) => root.querySelector(q));
    const options = this.getAttribute("engine") ? { engine: this.getAttribute("engine") } : {};
    (this.#given ? Promise.resolve(this.#given) : load(this.getAttribute("src"), options)).then((app) => {
      this.#app = app;
      const showEngine = () => { status.textContent = `engine: ${app.engine} (${app.reason})`; };
      showEngine();
      send.disabled = false;
      let tokens = 0;
      app.addEventListener("engine", () => { if (!send.disabled) showEngine(); });
      app.addEventListener("fallback", (e) => { output.textContent += ` [${e.detail.from} failed: finishing on ${e.detail.to}] `; });
      let live = true; // engine tokens are shown until the app's own streamed answer takes over
      app.addEventListener("token", (e) => { tokens += 1; if (live) output.textContent += e.detail.text; });
      send.onclick = async () => {
        send.disabled = true;
        output.textContent = "";
        tokens = 0;
        live = true;
        const started = performance.now();
        try {
          // Ask for a stream: an app that streams (chat does on `accept: text/event-stream`) is shown
          // piece by piece as its events arrive, whichever engine serves it; others answer whole.
          let streamed = "", sse = false, pending = "";
          const decoder = new TextDecoder();
          const res = await app.handle({ method: "POST", path: this.getAttribute("path") || "/", body: input.value,
                                          headers: { accept: "text/event-stream" } }, {
            onHead: (head) => {
              sse = head.headers.some(([k, v]) => k.toLowerCase() === "content-type" && v.startsWith("text/event-stream"));
              if (sse) { live = false; output.textContent = ""; }
            },
            onChunk: (chunk) => {
              if (!sse) return;
              pending += decoder.decode(chunk, { stream: true });
              const events = pending.split("\n\n");
              pending = events.pop();
              for (const event of events) {
                const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
                try {
                  const value = JSON.parse(data);
                  if (value.token !== undefined) streamed += value.token;
                  else if (value.error) streamed += ` [${value.error.type}: ${value.error.message}]`;
                } catch {}
                output.textContent = streamed;
              }
            },
          });
          let text = res.text();
          if (!sse) {
            try { text = JSON.parse(text).reply ?? JSON.stringify(JSON.parse(text), null, 2); } catch {}
            output.textContent = text;
          } else {
            output.textContent = streamed.trim();
          }
          const seconds = (performance.now() - started) / 1000;
          status.textContent = `engine: ${app.engine} (${app.reason}) · ${res.status} · ${tokens} tokens · ${(tokens / seconds).toFixed(1)} tokens/s`;
        } catch (err) {
          output.textContent = String(err.message || err);
        } finally {
          send.disabled = false;
          this.dispatchEvent(new CustomEvent("answer", { detail: output.textContent }));
        }
      };
    }, (err) => { status.textContent = `failed to load: ${err.message}`; });
  }

  disconnectedCallback() {
    if (this.#app !== this.#given) this.#app?.close(); // a given App is its giver's to close
  }
}

if (!customElements.get("amphibia-app")) customElements.define("amphibia-app", AmphibiaAppElement);

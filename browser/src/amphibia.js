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
  const worker = startWorker(); // its modules load while the app list is fetched
  const listing = await (await fetch(`${gateway}/api/apps`)).json();
  const info = listing.apps.find((a) => a.name === name);
  if (!info || !info.browser) {
    worker.terminate();
    throw new Error(info ? `app ${name} has no browser build` : `no app named ${name} at ${gateway}`);
  }
  const abs = (path) => new URL(path, gateway).href;
  const app = new App(name, worker, {
    app: name,
    coreWasm: info.core_wasm,
    gateway,
    base: abs(info.browser),
    shim: abs("/amphibia/shim/index.js"),
    wllamaWasm: abs("/amphibia/wllama/wasm/wllama.wasm"),
    // The app's policy (its app.toml), unless the page says otherwise: local | remote | auto | echo.
    engine: options.engine ?? info.engine ?? "auto",
    localModel: info.local_model ? { ...info.local_model, url: abs(info.local_model.url) } : null,
    maxLocalModelBytes: options.maxLocalModelBytes ?? listing.max_local_model_bytes,
    forceLocalUnavailable: options.forceLocalUnavailable ?? null,
    mode: options.mode ?? null, // null: JSPI where the browser has it, else the sync build
  });
  await app.ready;
  return app;
}

/** A module Worker from the runtime's own origin, also when the page is on another origin
 * (a Worker's script must be same-origin: a tiny blob module imports the real one). */
function startWorker() {
  const url = new URL("./worker.js", import.meta.url);
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
    this.#worker.onmessage = ({ data }) => settle(this.#calls, data);
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
    /** Resolves with the engine decision once the local model is loaded, or known to be unavailable. */
    this.localReady = this.#controlRpc("localReady");
  }

  /** A request on the Worker (`handle`, `init`) or on the control port; replies carry its id. */
  #request(target, calls, op, args, port) {
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      calls.set(id, { resolve, reject });
      target.postMessage({ id, op, args, port }, port ? [port] : []);
    });
  }

  #rpc(op, args, port) {
    return this.#request(this.#worker, this.#calls, op, args, port);
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

  /** Call the app's `handle` export; a guest that trapped is replaced by a fresh instance. */
  async handle({ method = "GET", path = "/", query = "", headers = {}, body = "" } = {}) {
    const bytes = typeof body === "string" ? new TextEncoder().encode(body) : new Uint8Array(body);
    const res = await this.#rpc("handle", { method, path, query, headers: Object.entries(headers), body: bytes });
    return { ...res, text: () => new TextDecoder().decode(res.body), json: () => JSON.parse(new TextDecoder().decode(res.body)) };
  }

  /** The same, with the Fetch API's Request and Response. */
  async fetch(request) {
    const url = new URL(request.url, location.href);
    const res = await this.handle({
      method: request.method, path: url.pathname, query: url.search.slice(1),
      headers: Object.fromEntries(request.headers), body: await request.arrayBuffer(),
    });
    return new Response(res.body, { status: res.status, headers: res.headers });
  }

  close() {
    this.#worker?.terminate();
    this.#control?.close();
  }
}

/** `<amphibia-app src="/apps/chat/">`: a default UI for an app running in this page. */
class AmphibiaAppElement extends HTMLElement {
  #app = null;

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
    load(this.getAttribute("src"), options).then((app) => {
      this.#app = app;
      const showEngine = () => { status.textContent = `engine: ${app.engine} (${app.reason})`; };
      showEngine();
      send.disabled = false;
      let tokens = 0;
      app.addEventListener("engine", () => { if (!send.disabled) showEngine(); });
      app.addEventListener("fallback", (e) => { output.textContent += ` [${e.detail.from} failed: finishing on ${e.detail.to}] `; });
      app.addEventListener("token", (e) => { tokens += 1; output.textContent += e.detail.text; });
      send.onclick = async () => {
        send.disabled = true;
        output.textContent = "";
        tokens = 0;
        const started = performance.now();
        try {
          const res = await app.handle({ method: "POST", path: this.getAttribute("path") || "/", body: input.value });
          let text = res.text();
          try { text = JSON.parse(text).reply ?? JSON.stringify(JSON.parse(text), null, 2); } catch {}
          output.textContent = text;
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
    this.#app?.close();
  }
}

if (!customElements.get("amphibia-app")) customElements.define("amphibia-app", AmphibiaAppElement);

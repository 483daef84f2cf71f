// Amphibia in the page: load an app and call it. The app itself runs in a module Worker.
//
//   import { load } from "/amphibia/amphibia.js";
//   const app = await load("/apps/chat/");
//   const res = await app.handle({ method: "POST", path: "/", body: "Hi" });
//
// Only the remote engine exists so far: every llm call goes over the gateway's /bridge WebSocket.

export async function load(appUrl, options = {}) {
  const url = new URL(appUrl, location.href);
  const name = url.pathname.split("/").filter(Boolean)[1];
  if (!name) throw new Error(`not an app URL: ${appUrl}`);
  const gateway = url.origin;
  const apps = await (await fetch(`${gateway}/api/apps`)).json();
  const info = apps.apps.find((a) => a.name === name);
  if (!info) throw new Error(`no app named ${name} at ${gateway}`);
  if (!info.browser) throw new Error(`app ${name} has no browser build`);
  const grant = await fetch(`${gateway}/bridge/token?app=${encodeURIComponent(name)}`);
  if (!grant.ok) throw new Error(`bridge token refused: ${grant.status} ${await grant.text()}`);
  const { token } = await grant.json();
  const app = new App(name, {
    base: new URL(info.browser, gateway).href,
    bridge: `${gateway.replace(/^http/, "ws")}/bridge?token=${encodeURIComponent(token)}`,
    shim: new URL("/amphibia/shim/index.js", gateway).href,
    ...options,
  });
  await app.ready;
  return app;
}

class App {
  constructor(name, config) {
    this.name = name;
    this.engine = "remote";
    this.#config = config;
    this.ready = this.#start();
  }

  #config;
  #worker = null;
  #calls = new Map();
  #nextId = 1;

  async #start() {
    this.#worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
    this.#worker.onmessage = ({ data }) => {
      const call = this.#calls.get(data.id);
      if (!call) return;
      this.#calls.delete(data.id);
      if (data.error) call.reject(Object.assign(new Error(data.error.message), data.error));
      else call.resolve(data.result);
    };
    this.#worker.onerror = (event) => {
      for (const call of this.#calls.values()) call.reject(new Error(event.message || "worker failed"));
      this.#calls.clear();
    };
    await this.#rpc("init", this.#config);
  }

  #rpc(op, args) {
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      this.#calls.set(id, { resolve, reject });
      this.#worker.postMessage({ id, op, args });
    });
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
  }
}

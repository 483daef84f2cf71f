// The local engine: llama.cpp compiled to WebAssembly (wllama), running the app's model on the
// visitor's device. wllama runs the model in a Worker of its own; this module decides whether the
// device can, loads the model (kept in OPFS by wllama, so a second visit downloads nothing) and
// turns completions into the same {next, cancel} generations the remote engine gives.
// wllama (275 KB of JS) is imported only when a model is actually loaded.

const MEMORY64_PROBE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 5, 3, 1, 4, 0]); // (memory i64 0)

/** Why this device cannot run `model` locally, or null if it can. */
export function localUnavailable(model, maxBytes) {
  if (!model) return "the app's model is not served to browsers";
  if (typeof WebAssembly.Suspending !== "function") return "this browser lacks JSPI (WebAssembly.Suspending)";
  if (!WebAssembly.validate(MEMORY64_PROBE)) return "this browser lacks WebAssembly Memory64";
  if (model.bytes > maxBytes) {
    return `model ${model.name} is ${(model.bytes / 1e6).toFixed(0)} MB, over the ${(maxBytes / 1e6).toFixed(0)} MB limit for local inference`;
  }
  const memoryGb = self.navigator?.deviceMemory;
  if (memoryGb !== undefined && memoryGb * 1e9 < model.bytes * 4) {
    return `the device reports ${memoryGb} GB of memory, too little for a ${(model.bytes / 1e6).toFixed(0)} MB model`;
  }
  return null;
}

class Stopped extends Error {}

export class LocalEngine {
  constructor(model, { wasmUrl, threads } = {}) {
    this.model = model; // {name, url, bytes, n_ctx} from /api/apps
    this.wasmUrl = wasmUrl;
    // Multi-threaded only where the page is cross-origin isolated (SharedArrayBuffer).
    this.threads = threads ?? (self.crossOriginIsolated ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1);
    this.wllama = null;
    this.inFlight = new Set();
    this.queue = Promise.resolve(); // wllama serves one completion at a time
    this.stopped = false;
  }

  /** Download (or open from OPFS) and load the model; returns {seconds, downloadedBytes}. */
  async load() {
    const started = performance.now();
    const url = new URL(this.model.url, self.location.href).href;
    const before = modelBytes(url);
    const quiet = { debug() {}, log() {}, warn() {}, error: console.error.bind(console) };
    const { Wllama } = await import("./wllama/index.js");
    this.wllama = new Wllama({ default: this.wasmUrl }, { suppressNativeLog: true, logger: quiet, allowOffline: true });
    this.wllama.setCompat(null); // never load code from a CDN: we checked JSPI + Memory64 ourselves
    const loadModel = () => this.wllama.loadModelFromUrl(url, { n_ctx: Math.min(this.model.n_ctx, 2048), n_threads: this.threads, useCache: true });
    // Apps in several Workers or tabs may want the same model at once: one downloads it into
    // OPFS while the others wait for the lock, then open the cached copy.
    if (self.navigator?.locks) await navigator.locks.request(`amphibia-model ${url}`, loadModel);
    else await loadModel();
    return { seconds: (performance.now() - started) / 1000, downloadedBytes: modelBytes(url) - before, threads: this.threads };
  }

  /** Stop the engine now: every generation in flight fails with `Stopped` (and may finish remotely). */
  async stop(reason = "local engine stopped") {
    this.stopped = true;
    for (const gen of this.inFlight) gen.fail(new Stopped(reason));
    this.inFlight.clear();
    const w = this.wllama;
    this.wllama = null;
    await w?.exit().catch(() => {});
  }

  async generate(model, prompt, messages, params) {
    if (this.stopped || !this.wllama) throw new Stopped("local engine is not running");
    if (model && model !== this.model.name) throw new Stopped(`model ${model} is not loaded locally`);
    const items = [];
    let wake = null;
    const push = (item) => { items.push(item); wake?.(); };
    const abort = new AbortController();
    let tokens = 0, usage = null, promptTokens = 0;
    const gen = { fail: (err) => { abort.abort(); push({ error: err }); } };
    this.inFlight.add(gen);
    const options = {
      stream: true, abortSignal: abort.signal, max_tokens: params.max_tokens ?? 100,
      temperature: params.temperature ?? 0.8, top_k: params.top_k ?? 40, top_p: params.top_p ?? 0.9,
      repeat_penalty: params.repeat_penalty ?? 1.1, repeat_last_n: params.repeat_last_n ?? 64,
      stop: params.stop?.length ? params.stop : undefined, seed: params.seed ?? undefined,
      grammar: params.grammar ?? undefined,  // GBNF, llama.cpp's grammar sampler inside wllama
      onData: (chunk) => {
        const choice = chunk.choices?.[0];
        const text = messages ? choice?.delta?.content : choice?.text;
        if (text) { tokens += 1; push({ text }); }
        if (chunk.usage) usage = chunk.usage;
        if (chunk.timings?.prompt_n) promptTokens = chunk.timings.prompt_n;
      },
    };
    const run = async () => {
      if (this.stopped) throw new Stopped("local engine stopped");
      if (messages) await this.wllama.createChatCompletion({ ...options, messages });
      else await this.wllama.createCompletion({ ...options, prompt });
      return { prompt_tokens: usage?.prompt_tokens ?? promptTokens, generated_tokens: usage?.completion_tokens ?? tokens };
    };
    const done = this.queue.then(run);
    this.queue = done.catch(() => {});
    done.then(
      (usage) => { this.inFlight.delete(gen); push({ done: { ...usage, finish_reason: "stop" } }); },
      (err) => { this.inFlight.delete(gen); if (!abort.signal.aborted) push({ error: err instanceof Stopped ? err : new Stopped(`local engine failed: ${err?.message ?? err}`) }); },
    );
    return {
      next: async () => {
        while (!items.length) await new Promise((r) => (wake = r));
        return items.shift();
      },
      cancel: () => { this.inFlight.delete(gen); abort.abort(); },
    };
  }
}

export { Stopped };

function modelBytes(url) {
  // Bytes of the model fetched by this context so far (Resource Timing; same origin or CORS-exposed).
  return performance.getEntriesByType("resource")
    .filter((e) => e.name.split("?")[0] === url.split("?")[0])
    .reduce((sum, e) => sum + (e.encodedBodySize || e.transferSize || 0), 0);
}

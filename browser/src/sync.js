// The guest's llm imports for browsers without JSPI: the sync build calls them as plain functions,
// so each call posts a request to the engine Worker and blocks on Atomics.wait until the answer is
// in a SharedArrayBuffer (which needs a cross-origin isolated page). Same shapes as llmImports.
import { params } from "./engines.js";

const WAITING = 0, DONE = 1, PARTIAL = 2;
const CAPACITY = 1 << 20; // bytes per chunk; longer answers come in several

export function startEngineWorker(config, port) {
  const url = new URL("./engine-worker.js", import.meta.url);
  const worker = url.origin === self.location.origin
    ? new Worker(url, { type: "module" })
    : new Worker(URL.createObjectURL(new Blob([`import ${JSON.stringify(url.href)};`], { type: "text/javascript" })), { type: "module" });
  const shared = new SharedArrayBuffer(8 + CAPACITY);
  worker.postMessage({ config, shared, port }, [port]);
  // Block only once it runs: a Worker starts through its parent's event loop, which a blocked
  // parent never returns to.
  return new Promise((resolve, reject) => {
    worker.onmessage = () => resolve(new BlockingChannel(worker, shared));
    worker.onerror = (event) => reject(new Error(`the engine worker failed to start: ${event.message ?? "error"}`));
  });
}

class BlockingChannel {
  constructor(worker, shared) {
    this.worker = worker;
    this.state = new Int32Array(shared, 0, 2); // [status, byte length]
    this.bytes = new Uint8Array(shared, 8);
  }

  /** Send `message` and block this thread until the engine Worker answers. */
  request(message) {
    const chunks = [];
    let next = message;
    for (;;) {
      Atomics.store(this.state, 0, WAITING);
      this.worker.postMessage(next);
      Atomics.wait(this.state, 0, WAITING);
      chunks.push(this.bytes.slice(0, this.state[1]));
      if (Atomics.load(this.state, 0) !== PARTIAL) break;
      next = { op: "more" };
    }
    const reply = JSON.parse(new TextDecoder().decode(chunks.length === 1 ? chunks[0] : concat(chunks)));
    if (reply.error) throw Object.assign(new Error(reply.error.message), { payload: reply.error.payload });
    return reply.ok;
  }
}

function concat(chunks) {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) { out.set(c, at); at += c.length; }
  return out;
}

export function syncLlmImports(channel) {
  class TokenStream {
    constructor(stream) { this.stream = stream; this.finished = false; }
    next() {
      if (this.finished) return undefined;
      let item;
      try {
        item = channel.request({ op: "next", stream: this.stream });
      } catch (err) {
        this.finished = true;
        throw err;
      }
      if (item.done) { this.finished = true; return undefined; }
      return item.text;
    }
    [Symbol.dispose ?? Symbol.for("dispose")]() {
      if (!this.finished) channel.request({ op: "cancel", stream: this.stream });
    }
  }
  const msgs = (messages) => messages.map(({ role, content }) => ({ role, content }));
  const open = (model, prompt, messages, p) => new TokenStream(channel.request({ op: "open", model, prompt, messages, params: params(p) }));
  const call = (model, method, args) => channel.request({ op: "call", model, method, args });
  return {
    TokenStream,
    infer: (model, prompt, p) => channel.request({ op: "complete", model, prompt, messages: null, params: params(p) }),
    chat: (model, messages, p) => channel.request({ op: "complete", model, prompt: null, messages: msgs(messages), params: params(p) }),
    inferStream: (model, prompt, p) => open(model, prompt, null, p),
    chatStream: (model, messages, p) => open(model, null, msgs(messages), p),
    generateEmbeddings: (model, texts) => {
      const value = call(model, "embed", { texts });
      return { embeddings: value.embeddings.map((v) => new Float32Array(v)), usage: { promptTokenCount: value.prompt_tokens } };
    },
    tokenize: (model, text) => new Uint32Array(call(model, "tokenize", { text })),
    detokenize: (model, tokens) => call(model, "detokenize", { tokens: Array.from(tokens) }),
  };
}

// LLM engines for a guest in the browser, and the WASI imports it needs.
// The bridge speaks the pool's wire messages (server/amphibia/pool/wire.py): assign, call, cancel
// out; token, done, failed, result back.

const ERROR_TAGS = {
  model_not_supported: "model-not-supported",
  invalid_input: "invalid-input",
  overloaded: "overloaded",
  timeout: "timeout",
};

function wasiError(errorType, message) {
  const tag = ERROR_TAGS[errorType] ?? "runtime-error";
  const val = tag === "model-not-supported" ? undefined : tag === "overloaded" ? 1000 : message;
  return Object.assign(new Error(message), { payload: { tag, val } });
}

export class RemoteEngine {
  constructor(url, onToken = () => {}) {
    this.url = url;
    this.onToken = onToken; // every streamed piece, for the page's live view
    this.pending = new Map();
    this.nextId = 1;
    this.socket = null;
  }

  #connect() {
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) return this.opened;
    this.socket = new WebSocket(this.url);
    this.opened = new Promise((resolve, reject) => {
      this.socket.onopen = resolve;
      this.socket.onerror = () => reject(new Error("bridge connection failed"));
    });
    this.socket.onmessage = ({ data }) => {
      const msg = JSON.parse(data);
      this.pending.get(msg.id)?.(msg);
    };
    this.socket.onclose = (event) => {
      for (const deliver of this.pending.values()) {
        deliver({ type: "failed", error_type: "runtime_error", message: `bridge closed (${event.code} ${event.reason})` });
      }
      this.pending.clear();
    };
    return this.opened;
  }

  async #send(message, onMessage) {
    await this.#connect();
    const id = `r${this.nextId++}`;
    this.pending.set(id, onMessage);
    this.socket.send(JSON.stringify({ ...message, id }));
    return id;
  }

  /** A generation as an async queue of pieces; `cancel()` frees its slot in the pool. */
  async generate(model, prompt, messages, params) {
    const queue = [];
    let wake = null;
    const push = (item) => { queue.push(item); wake?.(); };
    const id = await this.#send({ type: "assign", model, params, prompt, messages }, (msg) => {
      if (msg.type === "token") { this.onToken(msg.text); push({ text: msg.text }); }
      else if (msg.type === "done") { this.pending.delete(msg.id); push({ done: msg }); }
      else if (msg.type === "failed") { this.pending.delete(msg.id); push({ error: wasiError(msg.error_type, msg.message) }); }
    });
    return {
      next: async () => {
        while (!queue.length) await new Promise((r) => (wake = r));
        return queue.shift();
      },
      cancel: () => {
        if (this.pending.delete(id)) this.socket.send(JSON.stringify({ type: "cancel", id }));
      },
    };
  }

  async call(model, method, args) {
    return new Promise((resolve, reject) => {
      this.#send({ type: "call", model, method, args }, (msg) => {
        this.pending.delete(msg.id);
        if (msg.type === "result") resolve(msg.value);
        else reject(wasiError(msg.error_type, msg.message));
      }).catch(reject);
    });
  }
}

function params(p) {
  if (!p) return {};
  return {
    max_tokens: p.maxTokens, temperature: p.temperature, top_k: p.topK, top_p: p.topP,
    repeat_penalty: p.repeatPenalty, repeat_last_n: p.repeatPenaltyLastNTokenCount,
    stop: p.stop ?? [], seed: p.seed === undefined ? null : Number(p.seed),
  };
}

async function complete(engine, model, prompt, messages, p) {
  const gen = await engine.generate(model, prompt, messages, params(p));
  let text = "";
  for (;;) {
    const item = await gen.next();
    if (item.error) throw item.error;
    if (item.done) {
      return { text, usage: { promptTokenCount: item.done.prompt_tokens, generatedTokenCount: item.done.generated_tokens } };
    }
    text += item.text;
  }
}

export function llmImports(engine) {
  class TokenStream {
    constructor(gen) { this.gen = gen; this.finished = false; }
    async next() {
      if (this.finished) return undefined;
      const item = await this.gen.next();
      if (item.error) { this.finished = true; throw item.error; }
      if (item.done) { this.finished = true; return undefined; }
      return item.text;
    }
    [Symbol.dispose ?? Symbol.for("dispose")]() {
      if (!this.finished) this.gen.cancel();
    }
  }
  const msgs = (messages) => messages.map(({ role, content }) => ({ role, content }));
  return {
    TokenStream,
    infer: (model, prompt, p) => complete(engine, model, prompt, null, p),
    chat: (model, messages, p) => complete(engine, model, null, msgs(messages), p),
    inferStream: async (model, prompt, p) => new TokenStream(await engine.generate(model, prompt, null, params(p))),
    chatStream: async (model, messages, p) => new TokenStream(await engine.generate(model, null, msgs(messages), params(p))),
    generateEmbeddings: async (model, texts) => {
      const value = await engine.call(model, "embed", { texts });
      return { embeddings: value.embeddings.map((v) => new Float32Array(v)), usage: { promptTokenCount: value.prompt_tokens } };
    },
    tokenize: async (model, text) => new Uint32Array(await engine.call(model, "tokenize", { text })),
    detokenize: async (model, tokens) => engine.call(model, "detokenize", { tokens: Array.from(tokens) }),
  };
}

/** The WASI 0.2 imports from @bytecodealliance/preview2-shim's browser build, keyed as jco asks. */
export function wasiImports(shim) {
  const camel = (s) => s.replace(/-([a-z])/g, (_, c) => c.toUpperCase());
  const out = {};
  const names = {
    cli: ["environment", "exit", "stderr", "stdin", "stdout", "terminal-input", "terminal-output",
          "terminal-stderr", "terminal-stdin", "terminal-stdout"],
    clocks: ["monotonic-clock", "wall-clock"],
    filesystem: ["preopens", "types"],
    io: ["error", "poll", "streams"],
    random: ["random", "insecure", "insecure-seed"],
    sockets: ["instance-network", "ip-name-lookup", "network", "tcp", "tcp-create-socket", "udp", "udp-create-socket"],
  };
  for (const [pkg, ifaces] of Object.entries(names)) {
    for (const iface of ifaces) {
      const value = shim[pkg]?.[camel(iface)];
      if (value) out[`wasi:${pkg}/${iface}`] = value;
    }
  }
  return out;
}

// LLM engines for a guest in the browser, and the WASI imports it needs.
// The bridge speaks the pool's wire messages (server/amphibia/inference/pool/wire.py): assign, call,
// cancel out; token, done, failed, result back.

// Wire error kind -> WIT `error` case: the browser's copy of the table in server/amphibia/errors.py
// (LLM_ERRORS, each kind's `wit`); tests/test_browser.py checks that the two agree.
const ERROR_TAGS = {
  runtime_error: "runtime-error",
  model_not_supported: "model-not-supported",
  invalid_input: "invalid-input",
  model_not_allowed: "invalid-input",
  overloaded: "overloaded",
  timeout: "timeout",
};

function wasiError(errorType, message, retryAfterMs = 0) {
  const tag = ERROR_TAGS[errorType] ?? "runtime-error";
  const val = tag === "model-not-supported" ? undefined : tag === "overloaded" ? (retryAfterMs || 1000) : message;
  return Object.assign(new Error(message), { payload: { tag, val } });
}

export class RemoteEngine {
  /** `connectUrl()` gives a bridge URL with a fresh token (tokens are short-lived). */
  constructor(connectUrl, onToken = () => {}) {
    this.connectUrl = connectUrl;
    this.onToken = onToken; // every streamed piece, for the page's live view
    this.pending = new Map(); // request id -> {message, onMessage, progress}
    this.nextId = 1;
    this.socket = null;
    this.opened = null;
    this.reconnects = 0;
  }

  #connect() {
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) return this.opened;
    this.opened = (async () => {
      const socket = new WebSocket(await this.connectUrl());
      this.socket = socket;
      socket.onmessage = ({ data }) => {
        const msg = JSON.parse(data);
        this.pending.get(msg.id)?.onMessage(msg);
      };
      socket.onclose = (event) => this.#closed(socket, event);
      await new Promise((resolve, reject) => {
        socket.onopen = resolve;
        socket.onerror = () => reject(new Error("bridge connection failed"));
      });
    })();
    return this.opened;
  }

  /** The bridge dropped: requests in flight are sent again on a new connection, a generation
   * resuming after the text it already delivered, so its caller loses nothing. Refusals by the
   * gateway (bad token, foreign origin, flood) are final. */
  async #closed(socket, event) {
    if (socket !== this.socket || !this.pending.size) return;
    const retry = event.code !== 4401 && event.code !== 4403 && event.code !== 4429 && this.reconnects < 5;
    if (!retry) {
      for (const entry of this.pending.values()) {
        entry.onMessage({ type: "failed", error_type: "runtime_error", message: `bridge closed (${event.code} ${event.reason})` });
      }
      this.pending.clear();
      return;
    }
    this.reconnects += 1;
    await new Promise((r) => setTimeout(r, 200 * 2 ** (this.reconnects - 1)));
    try {
      await this.#connect();
      this.reconnects = 0;
      for (const [id, entry] of this.pending) {
        const resume = entry.progress ? { resume_text: entry.progress.text, resume_tokens: entry.progress.tokens } : {};
        this.socket.send(JSON.stringify({ ...entry.message, ...resume, id }));
      }
    } catch {
      this.#closed(this.socket, { code: 1006, reason: "reconnect failed" });
    }
  }

  async #send(message, onMessage, progress = null) {
    await this.#connect();
    const id = `r${this.nextId++}`;
    this.pending.set(id, { message, onMessage, progress });
    this.socket.send(JSON.stringify({ ...message, id }));
    return id;
  }

  /** A generation as an async queue of pieces; `cancel()` frees its slot in the pool. `resume`
   * ({text, tokens}) continues an answer another engine began. */
  async generate(model, prompt, messages, params, resume = null) {
    const queue = [];
    let wake = null;
    const push = (item) => { queue.push(item); wake?.(); };
    const progress = { text: resume?.text ?? "", tokens: resume?.tokens ?? 0 };
    const message = { type: "assign", model, params, prompt, messages };
    if (resume) Object.assign(message, { resume_text: progress.text, resume_tokens: progress.tokens });
    const id = await this.#send(message, (msg) => {
      if (msg.type === "token") { progress.text += msg.text; progress.tokens += 1; this.onToken(msg.text); push({ text: msg.text }); }
      else if (msg.type === "done") { this.pending.delete(msg.id); push({ done: msg }); }
      else if (msg.type === "failed") { this.pending.delete(msg.id); push({ error: wasiError(msg.error_type, msg.message, msg.retry_after_ms) }); }
    }, progress);
    return {
      next: async () => {
        while (!queue.length) await new Promise((r) => (wake = r));
        return queue.shift();
      },
      cancel: () => {
        if (this.pending.delete(id) && this.socket?.readyState === WebSocket.OPEN) {
          this.socket.send(JSON.stringify({ type: "cancel", id }));
        }
      },
    };
  }

  async call(model, method, args) {
    return new Promise((resolve, reject) => {
      this.#send({ type: "call", model, method, args }, (msg) => {
        this.pending.delete(msg.id);
        if (msg.type === "result") resolve(msg.value);
        else reject(wasiError(msg.error_type, msg.message, msg.retry_after_ms));
      }).catch(reject);
    });
  }

  /** Drop the connection as a network failure would (for tests and the benchmark). */
  dropConnection() {
    this.socket?.close(4000, "dropped by the page");
  }
}

/**
 * Which engine answers an app's llm calls in this page, and why. Policy "remote": the bridge.
 * "local": the device only. "auto": the bridge at once, the device as soon as its model is loaded
 * (if it can run it); a local generation that fails midway is finished by the bridge from the
 * text already delivered. Every decision is an "engine" event, every rescue a "fallback" event.
 */
export class EngineRouter {
  constructor(remote, policy, emit) {
    this.remote = remote;
    this.policy = policy;
    this.emit = emit;
    this.local = null;
    this.current = { engine: policy === "local" ? "local" : "remote", reason: "starting" };
    this.localReady = Promise.resolve(this.current);
  }

  decide(engine, reason) {
    this.current = { engine, reason, policy: this.policy };
    this.emit("engine", this.current);
    return this.current;
  }

  /** Start the local engine if the policy and the device allow; resolves with the decision. */
  startLocal(makeLocal, unavailable) {
    this.makeLocal = makeLocal;
    this.unavailable = unavailable;
    if (this.policy === "remote") {
      this.localReady = Promise.resolve(this.decide("remote", "the app or page asked for the remote engine"));
      return this.localReady;
    }
    if (unavailable) {
      this.localReady = Promise.resolve(this.policy === "local"
        ? this.decide("none", `local inference is required but unavailable: ${unavailable}`)
        : this.decide("remote", `local inference unavailable: ${unavailable}`));
      return this.localReady;
    }
    if (this.policy === "auto") this.decide("remote", "the shared pool answers while the local model loads");
    const local = makeLocal();
    this.loading = true;
    this.localReady = local.load().finally(() => { this.loading = false; }).then(
      (info) => {
        if (this.policy === "remote") { // the page switched to remote while the model loaded
          local.stop("the page switched to the remote engine");
          return this.current;
        }
        this.local = local;
        const from = info.downloadedBytes > 0 ? `downloaded ${(info.downloadedBytes / 1e6).toFixed(1)} MB` : "from the browser's cache";
        return { ...this.decide("local", `model ${local.model.name} runs on this device (${from}, loaded in ${info.seconds.toFixed(1)} s, ${info.threads} thread${info.threads > 1 ? "s" : ""})`), load: info };
      },
      (err) => this.policy === "local"
        ? this.decide("none", `the local model failed to load: ${err?.message ?? err}`)
        : this.decide("remote", `the local model failed to load: ${err?.message ?? err}`),
    );
    return this.localReady;
  }

  /** Switch policy from the page; a local engine in use is stopped (its generations finish remotely). */
  async use(policy) {
    this.policy = policy;
    if (policy === "remote") {
      const local = this.local;
      this.local = null;
      this.decide("remote", "the page switched to the remote engine");
      await local?.stop("the page switched to the remote engine");
      return this.current;
    }
    if (!this.local && !this.loading && this.makeLocal) {
      return this.startLocal(this.makeLocal, this.unavailable); // load (or re-load) the model now
    }
    return this.current;
  }

  async stopLocal(reason = "the local engine was stopped") {
    const local = this.local;
    this.local = null;
    if (this.policy === "local") this.decide("none", reason);
    else this.decide("remote", reason);
    await local?.stop(reason);
  }

  async generate(model, prompt, messages, params) {
    if (this.policy === "local" && !this.local) {
      await this.localReady; // local only: wait for the model instead of asking the pool
      if (!this.local) throw wasiError("runtime_error", this.current.reason);
    }
    if (!this.local) return this.remote.generate(model, prompt, messages, params);
    if (params?.json_schema) {
      // The page has no schema converter: the gateway turns a schema into a grammar (llama.cpp's own
      // converter), so this call goes to the pool. A plain GBNF grammar runs locally (wllama has it).
      const reason = "a JSON schema is turned into a grammar by the gateway: this call is served by the pool";
      if (this.policy === "local") throw wasiError("runtime_error", `local inference cannot take a JSON schema: ${reason}`);
      this.emit("fallback", { from: "local", to: "remote", reason, resumed_chars: 0 });
      return this.remote.generate(model, prompt, messages, params);
    }
    let gen;
    try {
      gen = await this.local.generate(model, prompt, messages, params);
    } catch (err) {
      if (this.policy === "local") throw wasiError("runtime_error", String(err.message ?? err));
      this.emit("fallback", { from: "local", to: "remote", reason: String(err.message ?? err), resumed_chars: 0 });
      return this.remote.generate(model, prompt, messages, params);
    }
    // Watch the local stream; if it fails midway, continue from its text on the bridge.
    let text = "", tokens = 0, active = gen;
    const router = this;
    return {
      async next() {
        const item = await active.next();
        if (item.text && active === gen) { text += item.text; tokens += 1; router.remote.onToken(item.text); }
        if (!item.error || active !== gen || router.policy === "local") {
          if (item.error && !item.error.payload) throw wasiError("runtime_error", String(item.error.message ?? item.error));
          return item;
        }
        router.emit("fallback", { from: "local", to: "remote", reason: String(item.error.message ?? item.error), resumed_chars: text.length });
        if (router.local) router.stopLocal(`the local engine failed: ${item.error.message ?? item.error}`);
        active = await router.remote.generate(model, prompt, messages, params, { text, tokens });
        return this.next();
      },
      cancel: () => active.cancel(),
    };
  }

  call(model, method, args) {
    // wllama has no tokenizer or embedding calls for a chat model: these always use the pool.
    return this.remote.call(model, method, args);
  }
}

/** Answers instantly with the prompt (or the last message): measures what a call costs in the
 * browser itself, JSPI suspension and the Worker included, with no model behind it. */
export class EchoEngine {
  async generate(model, prompt, messages) {
    const text = prompt ?? messages?.at(-1)?.content ?? "";
    const items = [{ text }, { done: { prompt_tokens: text.length, generated_tokens: text.length } }];
    return { next: async () => items.shift(), cancel() {} };
  }

  async call(model, method, args) {
    if (method === "tokenize") return Array.from(args.text, (c) => c.charCodeAt(0));
    if (method === "detokenize") return String.fromCharCode(...args.tokens);
    return { embeddings: args.texts.map((t) => [t.length]), prompt_tokens: args.texts.length };
  }
}

export function params(p) {
  if (!p) return {};
  return {
    max_tokens: p.maxTokens, temperature: p.temperature, top_k: p.topK, top_p: p.topP,
    repeat_penalty: p.repeatPenalty, repeat_last_n: p.repeatPenaltyLastNTokenCount,
    stop: p.stop ?? [], seed: p.seed === undefined ? null : Number(p.seed),
    json_schema: p.jsonSchema ?? null, grammar: p.grammar ?? null,
  };
}

export async function complete(engine, model, prompt, messages, p) {
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

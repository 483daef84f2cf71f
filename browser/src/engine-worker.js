// The engine Worker of the sync build: it owns the engine router (bridge and local engine) and
// answers the blocked guest through a SharedArrayBuffer (see sync.js), one request at a time.
import { complete } from "./engines.js";
import { controlOps, createRouter, serve } from "./engine-setup.js";

const DONE = 1, PARTIAL = 2;
let router = null, state = null, bytes = null, rest = null;
const streams = new Map();
let nextStream = 1;

const ops = {
  hello: () => router.current,
  complete: ({ model, prompt, messages, params }) => complete(router, model, prompt, messages, params),
  open: async ({ model, prompt, messages, params }) => {
    const id = nextStream++;
    streams.set(id, await router.generate(model, prompt, messages, params));
    return id;
  },
  next: async ({ stream }) => {
    const item = await streams.get(stream).next();
    if (item.error) { streams.delete(stream); throw item.error; }
    if (item.done) { streams.delete(stream); return { done: true }; }
    return { text: item.text };
  },
  cancel: ({ stream }) => { streams.get(stream)?.cancel(); streams.delete(stream); return true; },
  call: ({ model, method, args }) => router.call(model, method, args),
};

function answer(data) {
  const end = Math.min(data.length, bytes.length);
  bytes.set(data.subarray(0, end));
  rest = end < data.length ? data.subarray(end) : null;
  state[1] = end;
  Atomics.store(state, 0, rest ? PARTIAL : DONE);
  Atomics.notify(state, 0);
}

self.onmessage = async ({ data }) => {
  if (data.config) {
    state = new Int32Array(data.shared, 0, 2);
    bytes = new Uint8Array(data.shared, 8);
    const port = data.port;
    router = createRouter(data.config, (event, detail) => port.postMessage({ event, detail }));
    serve(port, controlOps(router));
    self.postMessage("ready");
    return;
  }
  if (data.op === "more") return answer(rest);
  let reply;
  try {
    reply = { ok: await ops[data.op](data) };
  } catch (err) {
    reply = { error: { message: String(err?.message ?? err), payload: err?.payload } };
  }
  answer(new TextEncoder().encode(JSON.stringify(reply)));
};

// `amphibia dev`'s page: the app's source in an editor, run at once in Pyodide (no build), saved to
// disk (the gateway rebuilds the component), reloaded when the files change on disk, and compared
// with the compiled component on the same request. `window.amphibiaDev` is the same for scripts.
import { load } from "./amphibia.js";

const $ = (id) => document.getElementById(id);
const root = $("dev");
const name = root.dataset.app;
const engine = root.dataset.engine || undefined; // `?engine=remote` overrides the app's policy
const base = `/dev/apps/${encodeURIComponent(name)}`;

let bundle = null; // the files as on disk (the last bundle fetched)
let edits = {}; // path -> text changed in the editor and not saved
let current = "app.py";
let source = null; // the App running the source in Pyodide
let compiled = null; // { app, sha } the compiled component, loaded when the switch is on
let lastBuildError = null;
const events = new EventTarget();

async function fetchBundle() {
  const res = await fetch(`${base}/bundle`, { cache: "no-store" });
  if (!res.ok) throw new Error(`${res.status} ${await res.text()}`);
  return res.json();
}

const files = () => ({ ...bundle.files, ...edits });

function showFile(path) {
  current = path;
  $("file").value = path;
  $("editor").value = files()[path] ?? "";
}

function showDirty() {
  const n = Object.keys(edits).length;
  $("dirty").textContent = n ? `${n} unsaved file${n > 1 ? "s" : ""}` : "saved";
}

let notes = null; // {notes, missing} for the files the page runs (null: as on disk)

function showNotes() {
  const list = [...(notes?.notes ?? bundle.notes)];
  for (const module of notes?.missing ?? source?.missing ?? []) {
    list.push({ module, file: "", line: 0, lacking: "pyodide",
                message: `the page's Pyodide lacks \`${module}\` (its npm package holds the core standard library only)` });
  }
  const ul = $("notes");
  ul.replaceChildren(...(list.length ? list : [{ message: "none: what the app imports runs in both" }]).map((n) => {
    const li = document.createElement("li");
    li.textContent = `${n.file ? `${n.file}:${n.line}: ` : ""}${n.lacking ? `[${n.lacking === "both" ? "both lack" : `${n.lacking} lacks`}] ` : ""}${n.message}`;
    li.dataset.lacking = n.lacking ?? "";
    return li;
  }));
}

function showError(result) {
  const pre = $("error");
  pre.replaceChildren();
  if (!result || result.ok) return;
  const { text, file, line } = result.error;
  pre.textContent = text;
  pre.dataset.file = file; pre.dataset.line = line;
  if (file && line) {
    const rel = file.replace(`/apps/${name}/`, "");
    const a = document.createElement("a");
    a.href = "#"; a.textContent = `\n→ ${rel}, line ${line}`;
    a.onclick = (e) => { e.preventDefault(); goTo(rel, line); };
    pre.append(a);
  }
}

function goTo(path, line) {
  if (path in files()) showFile(path);
  const lines = $("editor").value.split("\n");
  const start = lines.slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
  $("editor").focus();
  $("editor").setSelectionRange(start, start + (lines[line - 1]?.length ?? 0));
}

function log(text, cls = "") {
  const pre = $("console");
  const span = document.createElement("span");
  span.textContent = text.endsWith("\n") ? text : `${text}\n`;
  if (cls) span.className = cls;
  pre.append(span);
  pre.scrollTop = pre.scrollHeight;
}

function request() {
  const method = $("method").value;
  return { method, path: $("path").value || "/", headers: { "content-type": $("ctype").value },
           body: method === "GET" ? "" : $("body").value };
}

function render(res) {
  let text = res.text();
  try { text = JSON.stringify(JSON.parse(text), null, 2); } catch {}
  return `${res.status}\n${text}`;
}

/** Run the editor's files in Pyodide (no build, nothing saved); resolves with the load result. */
async function run() {
  const started = performance.now();
  const result = await source.reload(files());
  showError(result);
  refreshNotes();
  events.dispatchEvent(new CustomEvent("loaded", { detail: result }));
  if (!result.ok) {
    $("timing").textContent = `not loaded: ${result.error.type} (${Math.round(performance.now() - started)} ms)`;
    return result;
  }
  await send(started);
  return result;
}

/** Send the request to the source (and the compiled component when the switch is on). */
async function send(since = performance.now()) {
  const req = request();
  $("out-source").textContent = "";
  const decoder = new TextDecoder();
  const settle = (promise) => promise.then((value) => ({ status: "fulfilled", value }), (reason) => ({ status: "rejected", reason }));
  $("stop").disabled = false;
  const fromSource = await settle(source.handle(req, { onChunk: (c) => { $("out-source").textContent += decoder.decode(c, { stream: true }); } }));
  $("stop").disabled = true;
  // One after the other, not at once: two generations batched together can differ in the last bits
  // of their logits, and a greedy answer with them; alone, the same request gives the same tokens.
  const fromBuild = $("compare").checked ? await settle(compiledApp().then((app) => app.handle(req))) : null;
  const ms = Math.round(performance.now() - since);
  const out = { ms };
  if (fromSource.status === "fulfilled") { out.source = fromSource.value; $("out-source").textContent = render(out.source); }
  else $("out-source").textContent = `failed: ${fromSource.reason?.message ?? fromSource.reason}`;
  if (fromBuild) {
    if (fromBuild.status === "fulfilled") { out.compiled = fromBuild.value; $("out-build").textContent = render(out.compiled); }
    else $("out-build").textContent = `failed: ${fromBuild.reason?.message ?? fromBuild.reason}`;
    $("out-build").classList.remove("muted");
    const same = out.source && out.compiled && out.source.status === out.compiled.status && out.source.text() === out.compiled.text();
    // A greedy answer can still differ once: the engine reuses a prompt's cached KV, and llama.cpp's
    // numbers depend on how a prompt was batched. Sending again compares both with the prompt cached.
    $("match").textContent = same ? "identical answers" : "the answers differ (a first greedy run can: send again to compare with the prompt cached)";
    $("match").className = same ? "good" : "bad";
    out.identical = Boolean(same);
  }
  $("timing").textContent = `answered in ${ms} ms · engine: ${source.engine}`;
  events.dispatchEvent(new CustomEvent("answer", { detail: out }));
  return out;
}

/** The compiled component as the gateway serves it now (reloaded after each new build). */
async function compiledApp() {
  let listing, info;
  // An edit served from source on the server (the dev component) has no browser build: the compiled
  // side waits for the edit's own build (a few seconds), so it compares what was saved.
  for (const started = performance.now(); ; await new Promise((r) => setTimeout(r, 250))) {
    listing = await (await fetch("/api/apps", { cache: "no-store" })).json();
    info = listing.apps.find((a) => a.name === name);
    if (!info || !(info.from_source || info.updating) || performance.now() - started > 180_000) break;
    $("build").textContent = "(waiting for the saved edit's build…)";
  }
  if (!info) throw new Error(listing.failed?.[name] ?? `${name} has no build yet (${listing.building?.[name] ?? "building"})`);
  if (!info.browser) throw new Error(`${name} has no browser build yet`);
  if (compiled?.sha !== info.wasm_sha256) {
    compiled?.app.close();
    compiled = { sha: info.wasm_sha256, app: await load(`/apps/${name}/`, engine ? { engine } : {}) };
  }
  $("build").textContent = `build ${info.wasm_sha256.slice(0, 12)}${info.updating ? " (a new build is on its way)" : ""}${info.build_error ? " (the last edit failed to build: see the console)" : ""}`;
  if (info.build_error && info.build_error !== lastBuildError) log(`the component's build failed:\n${info.build_error}`, "bad");
  lastBuildError = info.build_error;
  return compiled.app;
}

/** Write the unsaved files to disk; the gateway's watcher rebuilds the component. */
async function save() {
  for (const [path, text] of Object.entries(edits)) {
    const res = await fetch(`${base}/files/${path.split("/").map(encodeURIComponent).join("/")}`, {
      method: "PUT", body: text, headers: { "x-amphibia-dev": "save", "content-type": "text/x-python; charset=utf-8" },
    });
    const body = await res.json();
    if (!res.ok) { log(`save failed: ${body.error?.message ?? res.status}`, "bad"); throw new Error(body.error?.message); }
    bundle.files[path] = text;
    bundle.version = body.version;
    delete edits[path];
    log(`saved ${path} (${body.bytes} bytes): the compiled component rebuilds`, "muted");
  }
  showDirty();
  const result = await source.reload(files()); // what is saved is what the page runs
  showError(result);
  refreshNotes();
  return result;
}

/** Follow the files on disk (long poll): an edit made elsewhere reloads the page's copy, unless the
 * editor has unsaved changes, which are never overwritten. */
async function follow() {
  for (;;) {
    try {
      const res = await fetch(`${base}/changes?version=${bundle.version}`, { cache: "no-store" });
      const change = await res.json();
      if (!change.changed || change.version === bundle.version) continue;
      const fresh = await fetchBundle();
      if (Object.keys(edits).length) {
        $("banner").textContent = "The files changed on disk; the editor keeps your unsaved changes. ";
        const b = document.createElement("button");
        b.textContent = "Load from disk";
        b.onclick = () => { edits = {}; adopt(fresh); };
        $("banner").append(b);
        continue;
      }
      await adopt(fresh);
    } catch (err) {
      log(`watching files: ${err.message ?? err}`, "bad");
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
}

/** The notes for the files the page now runs (unsaved edits included). */
async function refreshNotes() {
  try {
    const res = await fetch(`${base}/notes`, { method: "POST", body: JSON.stringify({ files: files() }),
                                               headers: { "content-type": "application/json" } });
    if (!res.ok) return;
    const found = await res.json();
    notes = { notes: found.notes, missing: await source.missingModules(found.stdlib) };
    showNotes();
  } catch (err) {
    log(`notes: ${err.message ?? err}`, "bad");
  }
}

async function adopt(fresh) {
  bundle = fresh;
  notes = null;
  $("banner").replaceChildren();
  fillFiles();
  showFile(current in bundle.files ? current : "app.py");
  showNotes();
  showDirty();
  const result = await source.reload(files());
  showError(result);
  log(`reloaded from disk (version ${bundle.version})`, "muted");
  events.dispatchEvent(new CustomEvent("reloaded", { detail: { version: bundle.version, result } }));
}

function fillFiles() {
  $("file").replaceChildren(...bundle.editable.map((p) => new Option(p, p)));
}

async function start() {
  const started = performance.now();
  bundle = await fetchBundle();
  fillFiles();
  showFile("app.py");
  showNotes();
  showDirty();
  source = await load(`/apps/${name}/`, { runtime: "pyodide", bundle, ...(engine ? { engine } : {}) });
  source.addEventListener("log", (e) => log(e.detail.text, e.detail.stream === "stderr" ? "bad" : ""));
  source.addEventListener("engine", () => showStatus());
  const showStatus = () => {
    $("status").textContent = `Pyodide ${source.pyodide ?? ""}, ready in ${Math.round(performance.now() - started)} ms · engine: ${source.engine} (${source.reason})`;
  };
  showStatus();
  const element = document.createElement("amphibia-app"); // the same output a page embedding the app shows
  element.app = source;
  $("try").append(element);
  showNotes();
  showError(source.loaded);
  $("editor").oninput = () => {
    if ($("editor").value === bundle.files[current]) delete edits[current];
    else edits[current] = $("editor").value;
    showDirty();
  };
  $("file").onchange = () => showFile($("file").value);
  $("run").onclick = () => run();
  $("save").onclick = () => save().catch(() => {});
  $("send").onclick = () => send();
  $("stop").onclick = () => { if (!source.interrupt()) log("this page cannot interrupt Python (not cross-origin isolated)", "bad"); };
  $("compare").onchange = () => { if ($("compare").checked) compiledApp().catch((e) => { $("out-build").textContent = String(e.message ?? e); }); };
  $("editor").onkeydown = (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); run(); }
    if ((e.ctrlKey || e.metaKey) && e.key === "s") { e.preventDefault(); save().catch(() => {}); }
    if (e.key === "Tab") { e.preventDefault(); document.execCommand("insertText", false, "    "); }
  };
  follow();
  return { ready_ms: Math.round(performance.now() - started), timings: source.timings };
}

const ready = start();
ready.catch((err) => { $("status").textContent = `failed to start: ${err.message ?? err}`; $("status").className = "bad"; });

window.amphibiaDev = {
  ready, events, run, send, save, compiledApp,
  get source() { return source; },
  edit(path, text) { showFile(path); $("editor").value = text; $("editor").dispatchEvent(new Event("input")); },
  setRequest({ method = "POST", path = "/", contentType = "text/plain", body = "" } = {}) {
    $("method").value = method; $("path").value = path; $("ctype").value = contentType; $("body").value = body;
  },
};

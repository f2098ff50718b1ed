// lineinspect preview page, review panel: the open line's recent DEFECT verdicts (or all, or one frame by id)
// with their overlay, and the operator's two answers. The token comes from the page URL, as in preview.js.
"use strict";
(() => {
  const params = new URLSearchParams(window.location.search);
  const token = params.get("token") || "";
  const panel = document.getElementById("review");
  const list = document.getElementById("review-list");
  const who = document.getElementById("reviewer");
  const all = document.getElementById("review-all");
  const frameInput = document.getElementById("review-frame");
  const windowEl = document.getElementById("review-window");
  const state = { line: null, items: [], outcomes: {}, error: null, loads: 0, pinned: "" };
  window.reviewState = state; // read by tests and for troubleshooting
  const nodes = new Map(); // frame id -> its <li> (kept across refreshes: thumbnail and outcome stay)
  const REFRESH_MS = 5000;

  try { who.value = window.localStorage.getItem("lineinspect.reviewer") || ""; } catch (e) { /* no storage */ }
  who.addEventListener("change", () => {
    try { window.localStorage.setItem("lineinspect.reviewer", who.value.trim()); } catch (e) { /* no storage */ }
  });

  async function request(path, options) {
    const headers = Object.assign({ "X-Preview-Token": token }, (options && options.headers) || {});
    const resp = await fetch(path, Object.assign({}, options, { headers, credentials: "same-origin" }));
    if (!resp.ok) {
      let message = resp.status + " " + resp.statusText;
      try { message = (await resp.json()).error || message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    return resp;
  }
  const api = async (path, options) => (await request(path, options)).json();
  const query = (obj) => new URLSearchParams(obj).toString();
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function thumbnail(img, frameId) {
    try {
      const blob = await (await request("/api/review/frame?" + query({ line: state.line, frame: frameId }))).blob();
      img.src = URL.createObjectURL(blob);
    } catch (err) {
      img.alt = String(err.message);
    }
  }

  function describe(o) {
    if (o.outcome !== "applied") return "failed: " + o.reason;
    if (o.decision === "ok") {
      return "applied by " + o.worker + ": +" + o.rows_added + " memory rows; score " + o.score_before.toFixed(3) +
        " \u2192 " + o.score_after.toFixed(3) + " (" + o.verdict_after.toUpperCase() + "); " +
        o.latency_s.toFixed(2) + " s after the click";
    }
    return "applied: filed as a confirmed defect (" + o.files.length + " files); " + o.latency_s.toFixed(2) + " s";
  }

  function showOutcome(frameId) {
    const li = nodes.get(frameId);
    const rec = state.outcomes[frameId];
    if (!li || !rec) return;
    const el = li.querySelector(".outcome");
    el.className = "outcome" + (rec.outcome ? " " + rec.outcome.outcome : rec.error ? " failed" : "");
    el.textContent = rec.outcome ? describe(rec.outcome) : rec.error ? "failed: " + rec.error : rec.note || "";
    for (const b of li.querySelectorAll("button")) b.disabled = Boolean(rec.pending);
  }

  async function waitOutcome(requestId, line) {
    const deadline = Date.now() + 120000;
    while (Date.now() < deadline) {
      const data = await api("/api/review/outcome?" + query({ line, request: requestId }));
      if (data.outcome) return data.outcome;
      await sleep(300);
    }
    throw new Error("no worker answered within 120 s");
  }

  async function decide(frameId, decision) {
    const name = who.value.trim();
    if (!name) {
      state.outcomes[frameId] = { error: "enter your name first" };
      showOutcome(frameId); who.focus();
      return;
    }
    const line = state.line;
    const rec = { decision, pending: true, note: "submitting\u2026", clicked: Date.now() };
    state.outcomes[frameId] = rec; showOutcome(frameId);
    try {
      const r = await api("/api/review", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ line, frame_id: frameId, decision, who: name }) });
      rec.request_id = r.request_id; rec.note = "waiting for a worker\u2026"; showOutcome(frameId);
      rec.outcome = await waitOutcome(r.request_id, line);
      rec.answered = Date.now();
    } catch (err) {
      rec.error = String(err.message);
    }
    rec.pending = false; showOutcome(frameId);
  }

  function itemNode(it) {
    const li = document.createElement("li");
    li.dataset.frame = it.frame_id;
    const img = document.createElement("img");
    img.alt = "overlay of " + it.frame_id;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = it.frame_id + " \u00b7 " + it.verdict.toUpperCase() + " " + it.score.toFixed(3) + " \u00b7 " +
      it.defects + " region(s) \u00b7 " + new Date(it.ts * 1000).toLocaleTimeString();
    const ok = document.createElement("button");
    ok.type = "button"; ok.className = "review-ok"; ok.textContent = "OK - false alarm";
    ok.addEventListener("click", () => decide(it.frame_id, "ok"));
    const bad = document.createElement("button");
    bad.type = "button"; bad.className = "review-defect"; bad.textContent = "Defect confirmed";
    bad.addEventListener("click", () => decide(it.frame_id, "defect"));
    const out = document.createElement("div");
    out.className = "outcome";
    li.append(img, meta, ok, bad, out);
    thumbnail(img, it.frame_id);
    return li;
  }

  function render(items) {
    const wanted = new Set(items.map((it) => it.frame_id));
    for (const [id, li] of nodes) {
      if (!wanted.has(id)) {
        const img = li.querySelector("img");
        if (img && img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
        nodes.delete(id);
      }
    }
    list.replaceChildren(...items.map((it) => {
      if (!nodes.has(it.frame_id)) nodes.set(it.frame_id, itemNode(it));
      return nodes.get(it.frame_id);
    }));
    for (const it of items) showOutcome(it.frame_id);
  }

  async function load() {
    if (!state.line) return;
    const p = { line: state.line, n: 24 };
    if (state.pinned) p.frame = state.pinned;
    else if (!all.checked) p.verdict = "defect";
    try {
      const data = await api("/api/review/recent?" + query(p));
      state.items = data.items; state.error = null; state.loads += 1;
      const w = data.window;
      windowEl.textContent = w.frames + " frames kept (" + (w.bytes / 1048576).toFixed(1) + " of " +
        (w.max_bytes / 1048576).toFixed(0) + " MiB)" + (state.pinned && !data.items.length ?
        " \u00b7 frame " + state.pinned + " is not kept" : "");
      render(data.items);
    } catch (err) {
      state.error = String(err.message);
      windowEl.textContent = "review: " + err.message;
    }
  }

  function open(line) {
    if (line === state.line) return;
    state.line = line; state.pinned = ""; frameInput.value = "";
    nodes.clear(); list.replaceChildren();
    panel.hidden = !line;
    load();
  }

  document.getElementById("review-refresh").addEventListener("click", load);
  document.getElementById("review-show").addEventListener("click", () => { state.pinned = frameInput.value.trim(); load(); });
  all.addEventListener("change", load);
  window.addEventListener("previewline", (ev) => open(ev.detail));
  if (window.previewState && window.previewState.line) open(window.previewState.line);
  setInterval(() => { if (!document.hidden) load(); }, REFRESH_MS);
  window.reviewRefresh = load; // tests: refresh now
})();

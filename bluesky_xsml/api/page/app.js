// The live page of the xsml steering service. No external libraries: it runs
// on machines without internet access. Every call sends the API key (from the
// URL fragment #key=..., or typed in) in the X-API-Key header when the page has
// one. The live feed (EventSource) and the pictures (<img>) cannot send headers:
// for them the page trades the key for the service's read cookie (POST
// /api/session; HttpOnly, so this script never sees it, and good for reads only).
"use strict";

const TIMELINE_FRAMES = 300;
const CARDS = 12;
const HISTORY = 10;
const STALE_S = 30;          // a decision older than this is marked stale
const state = {
  tags: [], thresholds: {}, defaults: {}, frames: [], lastId: -1, feedFrames: 0,
  runs: new Map(), selected: null, pinned: null, source: null,
  decision: null, decisionWhere: [], history: [], policy: "",
  finetune: null, checkpointTimer: null, shownId: -1, wantedId: -1,
  locked: false, keyRefused: false,
};

const $ = (sel) => document.querySelector(sel);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// ------------------------------------------------------------------ API key
function apiKey() { return $("#key-input").value.trim(); }
(function initKey() {
  const m = /(?:^|[#&])key=([^&]+)/.exec(location.hash);
  const stored = sessionStorage.getItem("xsml-key");
  const key = m ? decodeURIComponent(m[1]) : stored;
  if (m) history.replaceState(null, "", location.pathname + location.search);
  document.addEventListener("DOMContentLoaded", () => {
    if (key) $("#key-input").value = key;
    if (key) sessionStorage.setItem("xsml-key", key);
  });
})();

async function call(method, path, body) {
  const opts = { method, headers: {} };
  const key = apiKey();
  if (key || method !== "GET") opts.headers["X-API-Key"] = key;
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const msg = data && data.detail ? data.detail : r.statusText;
    const err = new Error(`${r.status}: ${msg}`);
    err.status = r.status;
    throw err;
  }
  return data;
}

// A read answered 401/403: the service wants a key this page lacks (or has wrong).
function needsKey(e) { return !!e && (e.status === 401 || e.status === 403); }

// Trade the key for the read cookie: true (set), false (key refused), null (no key,
// or the service could not be asked).
async function openSession() {
  if (!apiKey()) return null;
  try {
    await call("POST", "/api/session");
    return true;
  } catch (e) { return needsKey(e) ? false : null; }
}

// Reads need a key: one notice, the feed closed and no polling until a key is entered.
function lock() {
  state.locked = true;
  if (state.source) { state.source.close(); state.source = null; }
  const n = $("#key-notice");
  n.textContent = "This service needs the API key to show data; enter it above." +
    (state.keyRefused ? " The key this page has was refused." : "");
  n.classList.add("needs-key");
  n.hidden = false;
  $("#status").textContent = "waiting for the API key";
  $("#key-input").placeholder = "needed to show data";
  drawTimeline();   // an empty timeline, not a tall black box
}

function keyNotice() {
  const n = $("#key-notice");
  $("#key-input").placeholder = "needed to change things";
  n.classList.remove("needs-key");
  n.textContent = "The API key entered was refused: changes made here will be refused too.";
  n.hidden = !state.keyRefused;
}

async function keyChanged() {
  sessionStorage.setItem("xsml-key", apiKey());
  if (state.locked) { await begin(); return; }
  state.keyRefused = (await openSession()) === false;
  keyNotice();
}

function show(target, text, ok) {
  const e = $(target);
  e.textContent = text;
  e.classList.toggle("error", !ok);
}

// ------------------------------------------------------------ formatting
function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
function ms(x) { return x === null || x === undefined ? "–" : `${(1000 * x).toFixed(0)} ms`; }
function age(t) {
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 90) return `${s.toFixed(0)} s ago`;
  if (s < 5400) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString([], { hour12: false }); }

function runOf(uid) { return state.runs.get(uid) || null; }
function scanLabel(scanId, plan) {
  return (scanId === null || scanId === undefined ? "scan ?" : `scan ${scanId}`) +
    (plan ? ` · ${plan}` : "");
}
function runStateText(run) {
  if (!run || !run.state) return "";
  if (run.state === "open") return "running";
  return run.exit_status && run.exit_status !== "success" ? run.exit_status : "finished";
}
function position(run, k, v) {
  if (v === null || v === undefined) return `${k} –`;
  if (typeof v !== "number") return `${k} ${v}`;
  const digits = run && run.precision && k in run.precision ? run.precision[k] : 3;
  const unit = run && run.units && run.units[k] ? ` ${run.units[k]}` : "";
  return `${k} ${v.toFixed(Math.min(Math.max(digits, 0), 6))}${unit}`;
}
// "sample_x 3.200 mm · sample_y 1.100"; the run's baseline positions when the event has none
function positionsText(run, positions) {
  let pos = positions || {};
  let fixed = false;
  if (!Object.keys(pos).length && run && run.fixed_positions) {
    pos = run.fixed_positions;
    fixed = true;
  }
  const parts = Object.entries(pos).slice(0, 4).map(([k, v]) => position(run, k, v));
  if (!parts.length) return "no motor positions recorded";
  return parts.join(" · ") + (fixed ? " (baseline)" : "");
}
function frameTitle(f) {
  return `${scanLabel(f.scan_id, f.plan_name)} · ${f.stream} #${f.seq_num}` +
    (f.frame_index ? `[${f.frame_index}]` : "");
}

// ------------------------------------------------------------------- status
async function refreshStatus() {
  if (state.locked) return;
  try {
    const s = await call("GET", "/api/status");
    const skipped = Object.entries(s.skipped_by_reason).map(([k, v]) => `${k}:${v}`).join(" ");
    $("#status").textContent =
      `model ${s.checkpoint_id} on ${s.device} · ${fmt(s.frames_per_s, 1)} frames/s · ` +
      `latency p50 ${ms(s.latency_p50_s)} p99 ${ms(s.latency_p99_s)} · ` +
      `queue ${s.queue_jobs} · tagged ${s.frames_tagged} · skipped ${s.frames_skipped}` +
      (skipped ? ` (${skipped})` : "") +
      (s.finetune ? ` · fine-tune ${s.finetune.state}, ${s.finetune.labels} labels` : "");
    if (s.policy !== undefined && s.policy !== state.policy) {
      state.policy = s.policy;
      drawDecision();
    }
    setFinetune(s.finetune);
  } catch (e) {
    if (needsKey(e)) lock();
    else $("#status").textContent = `status unavailable (${e.message})`;
  }
}

// ------------------------------------------------------------ fine-tuning
// With fine-tuning off the corrections, retraining and checkpoints cannot work:
// their controls are hidden, one notice says why, and nothing polls for them.
function setFinetune(ft) {
  const on = !!ft;
  const was = state.finetune;
  state.finetune = ft || null;
  $("#ft-controls").hidden = !on;
  $("#checkpoints").hidden = !on;
  $("#ft-notice").hidden = on;
  document.body.classList.toggle("no-finetune", !on);
  $("#frames-hint").textContent = on ? "click a frame to show it above and correct its tags"
    : "click a frame to show it above";
  if (on) {
    $("#finetune-status").textContent =
      `fine-tuning ${ft.state}: ${ft.labels} labels, ` +
      `${ft.labels_pending} not yet trained on, ${ft.rounds} rounds, ${ft.promoted} promoted`;
    if (!was) {
      refreshCheckpoints();
      if (!state.checkpointTimer) state.checkpointTimer = setInterval(refreshCheckpoints, 10000);
    }
  } else {
    $("#finetune-status").textContent = "";
    $("#ft-notice").textContent = "Fine-tuning is off for this service, so frames cannot be " +
      "corrected and the model cannot be retrained or rolled back here. Start it with " +
      "`xsml serve --finetune-dir DIR` (or call enable_finetuning before serving) to turn it on.";
    $("#editor").hidden = true;
    if (state.checkpointTimer) { clearInterval(state.checkpointTimer); state.checkpointTimer = null; }
  }
}

// ---------------------------------------------------------------- decisions
function whereOf(ref, i, where) {
  if (where && where[i]) return where[i];
  const f = state.frames.find((x) => x.run_uid === ref.run_uid && x.stream === ref.stream &&
    x.seq_num === ref.seq_num && (!ref.key || x.key === ref.key));
  return f ? { scan_id: f.scan_id, plan_name: f.plan_name, positions: f.positions } : null;
}

function evidenceLine(ref, w) {
  const run = runOf(ref.run_uid);
  const head = w ? `${scanLabel(w.scan_id, w.plan_name)} · ${ref.stream} #${ref.seq_num}`
    : `${ref.stream} #${ref.seq_num}`;
  const where = w ? positionsText(run, w.positions) : "position not known to this page";
  const what = ref.skip_reason ? `skipped (${ref.skip_reason})` : ref.tags.join(", ") || "no tags";
  return `${head} · ${where}: ${what}`;
}

function setDecision(d, where, policy) {
  if (policy !== undefined && policy !== null) state.policy = policy;
  // the service's rule for its history: every decision but a continue after a continue
  const prev = state.decision;
  const kept = d.action !== "continue" || (prev && prev.uid !== d.uid && prev.action !== "continue");
  if (kept && !state.history.some((h) => h.uid === d.uid)) state.history.push(d);
  state.history = state.history.slice(-50);
  state.decision = d;
  state.decisionWhere = where || [];
  drawDecision();
}

function drawDecision() {
  const d = state.decision;
  if (!d) return;
  $("#decision-box").dataset.uid = d.uid;
  const a = $("#decision-action");
  a.textContent = d.action;
  a.className = "action " + d.action;
  $("#decision-policy").textContent = `policy ${state.policy || "?"}` +
    (d.rule ? ` · rule ${d.rule}` : "");
  $("#decision-reason").textContent = d.reason;
  const ev = d.evidence || [];
  const newest = ev.length ? whereOf(ev[ev.length - 1], ev.length - 1, state.decisionWhere) : null;
  $("#decision-where").textContent = newest
    ? `newest evidence at ${scanLabel(newest.scan_id, newest.plan_name)}, ` +
      positionsText(runOf(ev[ev.length - 1].run_uid), newest.positions) : "";
  const ul = $("#decision-evidence");
  ul.replaceChildren();
  const first = Math.max(0, ev.length - 8);
  ev.slice(first).forEach((f, j) => {
    ul.append(el("li", "", evidenceLine(f, whereOf(f, first + j, state.decisionWhere))));
  });
  drawHistory();
  drawAges();
}

function drawHistory() {
  const ol = $("#decision-history");
  ol.replaceChildren();
  const cur = state.decision ? state.decision.uid : null;
  const past = state.history.filter((h) => h.uid !== cur).slice(-HISTORY).reverse();
  if (!past.length) ol.append(el("li", "muted", "none yet"));
  for (const h of past) {
    const li = el("li", "past");
    li.dataset.time = String(h.time);
    const run = runOf(h.run_uid);
    const ev = h.evidence || [];
    const w = ev.length ? whereOf(ev[ev.length - 1], -1, null) : null;
    li.append(el("span", "action " + h.action, h.action), " ",
      el("span", "age", ""), " ",
      el("span", "scan", run ? scanLabel(run.scan_id, run.plan_name) : ""), " ",
      el("span", "", h.reason + (w ? ` (${positionsText(run, w.positions)})` : "")));
    ol.append(li);
  }
}

// Ages tick every second; a decision older than STALE_S, or of a run that has ended, is stale.
function drawAges() {
  const d = state.decision;
  if (d) {
    const old = Date.now() / 1000 - d.time;
    const run = runOf(d.run_uid);
    const ended = run && run.state === "closed";
    const stale = d.evidence && d.evidence.length && (old > STALE_S || ended);
    $("#decision-age").textContent = `made ${age(d.time)} (${clock(d.time)})` +
      (stale ? ended ? ` · stale: its run ${runStateText(run)}` : " · stale: no newer decision" : "");
    $("#decision-box").classList.toggle("stale", !!stale);
  }
  document.querySelectorAll("#decision-history li.past").forEach((li) => {
    const t = Number(li.dataset.time);
    li.querySelector(".age").textContent = `${clock(t)}, ${age(t)}`;
  });
}

// ------------------------------------------------------------------- runs
function setRun(r) {
  state.runs.set(r.run_uid, r);
  document.querySelectorAll(".frame-card").forEach((c) => {
    if (c.dataset.run === r.run_uid) c.querySelector(".runstate").textContent = runStateText(r);
  });
  if (state.shown && state.shown.run_uid === r.run_uid) drawCurrentText(state.shown);
  drawDecision();
}

// ------------------------------------------------------------------- frames
function addFrames(frames, live) {
  for (const f of frames) {
    if (f.id <= state.lastId) continue;
    state.frames.push(f);
    state.lastId = f.id;
    if (live) state.feedFrames += 1;
    if (!state.runs.has(f.run_uid)) {
      state.runs.set(f.run_uid, { run_uid: f.run_uid, scan_id: f.scan_id, plan_name: f.plan_name });
      call("GET", `/api/runs/${encodeURIComponent(f.run_uid)}`).then(setRun).catch(() => {});
    }
  }
  if (state.frames.length > TIMELINE_FRAMES) state.frames.splice(0, state.frames.length - TIMELINE_FRAMES);
  $("#frame-count").textContent = String(state.frames.length);
  $("#live-count").textContent = String(state.feedFrames);
  drawTimeline();
  drawCards();
  if (!state.pinned && state.frames.length) showCurrent(state.frames[state.frames.length - 1]);
}

const TL_LEFT = 130, TL_AXIS = 16;
function drawTimeline() {
  const c = $("#timeline");
  const ctx = c.getContext("2d");
  const n = Math.max(1, state.tags.length);
  const rowH = 11;
  c.width = Math.max(300, Math.round(c.clientWidth || 1100));  // drawn at its shown size
  c.height = rowH * n + 4 + TL_AXIS;
  const plotH = rowH * n + 4;
  ctx.fillStyle = "#0b0d10";
  ctx.fillRect(0, 0, c.width, c.height);
  // a column per frame, oldest left; a few frames do not shrink into one corner
  const w = (c.width - TL_LEFT) / Math.max(state.frames.length, 60);
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "middle";
  state.tags.forEach((t, j) => {
    ctx.fillStyle = "#9aa3ad";
    ctx.fillText(t, 2, j * rowH + rowH / 2 + 2);
  });
  // cells: a tag the frame was given (its tags, as recorded) is bright; others show p faintly
  state.frames.forEach((f, i) => {
    const x = TL_LEFT + i * w;
    if (!f.probs) {
      ctx.fillStyle = "#553";
      ctx.fillRect(x, 2, Math.max(1, w - 0.5), plotH - 4);
      return;
    }
    const given = new Set(f.tags);
    state.tags.forEach((t, j) => {
      const p = f.probs[t];
      if (p === null || p === undefined) return;
      ctx.fillStyle = given.has(t) ? `rgba(250, 190, 40, ${0.55 + 0.45 * p})`
        : `rgba(80, 120, 200, ${0.6 * p})`;
      ctx.fillRect(x, j * rowH + 2, Math.max(1, w - 0.5), rowH - 1);
    });
  });
  // axis: run boundaries (a line where the run changes) and event numbers
  const axis = $("#timeline-axis");
  axis.replaceChildren();
  ctx.strokeStyle = "#d8dde3";
  ctx.fillStyle = "#9aa3ad";
  ctx.fillRect(TL_LEFT, plotH, c.width - TL_LEFT, 1);
  const pct = (x) => `${(100 * x / c.width).toFixed(3)}%`;
  const starts = state.frames.map((f, i) => i).filter((i) =>
    !i || state.frames[i - 1].run_uid !== state.frames[i].run_uid);
  let lastTick = -1e9;
  state.frames.forEach((f, i) => {
    const x = TL_LEFT + i * w;
    const k = starts.indexOf(i);
    if (k >= 0) {
      // a run boundary: a line, and the scan's label as far as there is room for it
      ctx.fillStyle = "#d8dde3";
      ctx.fillRect(x - 1, 0, 2, plotH + 6);
      const full = scanLabel(f.scan_id, f.plan_name);
      const room = ((k + 1 < starts.length ? starts[k + 1] : state.frames.length) - i) * w;
      const mark = el("span", "run-mark", room >= 7 * full.length ? full
        : room >= 40 ? `scan ${f.scan_id ?? "?"}` : String(f.scan_id ?? "?"));
      mark.title = full;
      mark.dataset.run = f.run_uid;
      mark.dataset.scanId = String(f.scan_id ?? "");
      mark.style.left = pct(x);
      axis.append(mark);
      lastTick = x + Math.min(room, 7 * full.length);
    } else if (x - lastTick >= 60) {
      ctx.fillStyle = "#9aa3ad";
      ctx.fillRect(x, plotH, 1, 5);
      const tick = el("span", "tick", `#${f.seq_num}`);
      tick.style.left = pct(x);
      axis.append(tick);
      lastTick = x;
    }
  });
}

function thumbUrl(f) {
  const q = new URLSearchParams({ stream: f.stream, key: f.key, frame_index: f.frame_index, scale: 1 });
  return `/api/runs/${encodeURIComponent(f.run_uid)}/frames/${f.seq_num}/thumbnail.png?${q}`;
}

// An image is put on the page only once it has loaded; until then a grey
// placeholder (never black: black is what a beam-off frame looks like). When
// there is none, the error says why: the thumbnail route's 404 detail.
function loadImage(url, alt) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.alt = alt;
    img.onload = () => resolve(img);
    img.onerror = () => noPreviewDetail(url).then((detail) => reject(new Error(detail)));
    img.src = url;
  });
}

// The service's reason for a missing thumbnail (an <img> cannot read a 404's
// body, so the route is asked again); "" when it gives none.
function noPreviewDetail(url) {
  return fetch(url).then((r) => (r.ok ? "" : r.json().then((j) => String(j.detail || ""))))
    .catch(() => "");
}

// The reason alone, without the frame's address that starts the detail
// ("no thumbnail for frame 0 of event 3 (...) of run '...': <reason>").
function noPreviewReason(f, detail) {
  const at = detail.indexOf(": ", detail.indexOf(f.run_uid));
  return at >= 0 ? detail.slice(at + 2) : detail;
}

function drawCards() {
  const box = $("#frames");
  const recent = state.frames.slice(-CARDS).reverse();
  const have = new Map([...box.children].map((c) => [c.dataset.id, c]));
  const wanted = new Set(recent.map((f) => String(f.id)));
  for (const [id, card] of have) if (!wanted.has(id)) card.remove();
  recent.forEach((f, i) => {
    let card = have.get(String(f.id));
    if (!card) {
      card = el("div", "frame-card" + (f.probs ? "" : " skipped"));
      card.dataset.id = String(f.id);
      card.dataset.seq = String(f.seq_num);
      card.dataset.run = f.run_uid;
      const thumb = el("div", "thumb placeholder");
      thumb.append(el("span", "note", f.probs ? "loading…" : "not tagged"));
      if (f.probs) {
        loadImage(thumbUrl(f), frameTitle(f)).then((img) => {
          thumb.replaceChildren(img);
          thumb.classList.remove("placeholder");
        }).catch((err) => {
          thumb.firstChild.textContent = "no preview";
          thumb.title = err.message ? `no preview: ${noPreviewReason(f, err.message)}` : "";
        });
      }
      const run = runOf(f.run_uid);
      const head = el("div", "meta");
      head.append(el("span", "scan", frameTitle(f)), " ", el("span", "runstate", runStateText(run)));
      card.append(thumb, head, el("div", "where", positionsText(run, f.positions)));
      const chips = el("div", "chips");
      if (f.skip_reason) chips.append(el("span", "chip", "skipped: " + f.skip_reason));
      for (const t of f.tags) chips.append(el("span", "chip", t));
      card.append(chips);
      card.addEventListener("click", () => selectFrame(f, card));
    }
    if (box.children[i] !== card) box.insertBefore(card, box.children[i] || null);
  });
}

// ------------------------------------------------------------ current frame
// The newest frame (or a pinned one): its picture, where it was taken, and one
// bar per tag (width = probability, tick = threshold). The previous picture stays
// until the new one has loaded, and text and bars change with it.
function showCurrent(f) {
  state.wantedId = f.id;
  if (!f.probs) { drawCurrent(f, null); return; }
  loadImage(thumbUrl(f), frameTitle(f)).then((img) => {
    const newer = state.pinned ? f === state.pinned : f.id >= state.shownId;
    if (newer) drawCurrent(f, img);
  }).catch((err) => { if (state.wantedId === f.id) drawCurrent(f, null, err.message); });
}

function drawCurrent(f, img, detail = "") {
  state.shownId = f.id;
  const view = $("#current-view");
  const old = $("#current-img");
  if (img) {
    img.id = "current-img";
    img.dataset.frameId = String(f.id);
    old.replaceWith(img);
    view.classList.remove("placeholder");
    $("#current-note").textContent = "";
    view.title = "";
  } else {
    old.hidden = true;
    view.classList.add("placeholder");
    const why = detail ? `: ${noPreviewReason(f, detail)}` : "";
    $("#current-note").textContent = f.probs ? `no preview kept for this frame${why}`
      : `not tagged: ${f.skip_reason || "skipped"}`;
    view.title = f.probs ? detail : "";
  }
  view.dataset.frameId = String(f.id);
  state.shown = f;
  drawCurrentText(f);
  const box = $("#current-probs");
  box.replaceChildren();
  if (!f.probs) return;
  const given = new Set(f.tags);
  const order = state.tags.filter((t) => f.probs[t] !== null && f.probs[t] !== undefined)
    .sort((a, b) => f.probs[b] - f.probs[a]);
  for (const t of order) {
    const p = f.probs[t];
    const row = el("div", "prob" + (given.has(t) ? " on" : ""));
    row.dataset.tag = t;
    row.dataset.p = String(p);
    const bar = el("div", "bar");
    const fill = el("div", "fill");
    fill.style.width = `${(100 * p).toFixed(2)}%`;
    const tick = el("div", "threshold");
    tick.style.left = `${(100 * (state.thresholds[t] ?? 0.5)).toFixed(2)}%`;
    bar.append(fill, tick);
    row.append(el("span", "name", t), bar, el("span", "value", p.toFixed(2)));
    box.append(row);
  }
}

function drawCurrentText(f) {
  const run = runOf(f.run_uid);
  const rs = runStateText(run);
  $("#current-title").textContent = frameTitle(f) +
    (rs ? rs === "running" ? " · run still open" : ` · run ${rs}` : "");
  $("#current-where").textContent = positionsText(run, f.positions) +
    (run && run.sample ? ` · sample ${run.sample}` : "") + ` · tagged ${clock(f.time)}`;
}

function selectFrame(f, card) {
  state.pinned = f;
  document.querySelectorAll(".frame-card.selected").forEach((c) => c.classList.remove("selected"));
  card.classList.add("selected");
  $("#current-mode").textContent = "pinned";
  $("#current-live").hidden = false;
  showCurrent(f);
  showSimilar(f);
  if (state.finetune) openEditor(f);
}

// ------------------------------------------------------------- similar frames
// The frames most like a pinned one (GET .../similar): similarity, where, tags.
async function showSimilar(f) {
  const list = $("#similar-list");
  $("#similar-title").textContent = frameTitle(f) + (f.novel ? " (novel)" : "");
  $("#similar").hidden = false;
  list.replaceChildren(el("li", "note", "searching…"));
  const q = new URLSearchParams({ stream: f.stream, key: f.key, frame_index: f.frame_index, k: 8 });
  try {
    const r = await fetch(`/api/runs/${encodeURIComponent(f.run_uid)}/frames/${f.seq_num}/similar?${q}`);
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const body = await r.json();
    if (state.pinned !== f) return;
    list.replaceChildren();
    if (!body.frames.length) {
      list.append(el("li", "note", "no embeddings: the model has no novelty statistics"));
      return;
    }
    for (const s of body.frames) {
      const li = el("li", "similar-item");
      li.dataset.run = s.run_uid;
      li.dataset.seq = String(s.seq_num);
      li.append(el("span", "sim", s.similarity.toFixed(3)), " ", el("span", "scan", frameTitle(s)),
        " ", el("span", "tags", s.tags.length ? s.tags.join(", ") : "no tags"));
      list.append(li);
    }
  } catch (e) {
    if (state.pinned === f) list.replaceChildren(el("li", "note", "search failed: " + e.message));
  }
}

function backToLive() {
  state.pinned = null;
  document.querySelectorAll(".frame-card.selected").forEach((c) => c.classList.remove("selected"));
  $("#current-mode").textContent = "live";
  $("#current-live").hidden = true;
  $("#similar").hidden = true;
  if (state.frames.length) showCurrent(state.frames[state.frames.length - 1]);
}

// ------------------------------------------------------------------ editor
function openEditor(f) {
  state.selected = f;
  $("#editor").hidden = false;
  $("#editor-title").textContent = frameTitle(f);
  const box = $("#editor-tags");
  box.replaceChildren();
  for (const t of state.tags) {
    const lab = el("label", "tag-toggle");
    const cb = el("input");
    cb.type = "checkbox";
    cb.dataset.tag = t;
    cb.checked = f.tags.includes(t);
    const p = f.probs ? f.probs[t] : null;
    lab.append(cb, el("span", "name", t), el("span", "value", p === null || p === undefined ? "" : p.toFixed(2)));
    box.append(lab);
  }
  show("#label-result", "", true);
}

async function sendLabels() {
  const f = state.selected;
  if (!f) return;
  const tags = {};
  document.querySelectorAll("#editor-tags input[data-tag]").forEach((cb) => { tags[cb.dataset.tag] = cb.checked; });
  try {
    const r = await call("POST", "/api/labels", {
      run_uid: f.run_uid, seq_num: f.seq_num, stream: f.stream, key: f.key,
      frame_index: f.frame_index, tags,
    });
    const rec = r.receipts[0];
    show("#label-result", `stored: ${frameTitle(f)} labeled (replay rows ${rec.replay_rows}, ` +
      `${rec.pending} waiting for training)`, true);
    refreshStatus();
  } catch (e) { show("#label-result", e.message, false); }
}

// -------------------------------------------------------------- thresholds
function buildThresholds() {
  const box = $("#thresholds");
  box.replaceChildren();
  for (const t of state.tags) {
    const lab = el("label", "threshold");
    lab.dataset.tag = t;
    const name = el("span", "name", t);
    name.title = t;
    const s = el("input");
    s.type = "range"; s.min = "0"; s.max = "1"; s.step = "0.01";
    s.value = String(state.thresholds[t]);
    s.dataset.tag = t;
    const v = el("span", "value", "");
    s.addEventListener("input", () => markThreshold(t, s, v, Number(s.value)));
    s.addEventListener("change", () => setThreshold(t, Number(s.value), s, v));
    lab.append(name, s, v);
    box.append(lab);
    markThreshold(t, s, v, state.thresholds[t]);
  }
}

function markThreshold(tag, slider, label, value) {
  const d = state.defaults[tag];
  const moved = d !== undefined && Math.abs(value - d) > 1e-6;
  label.textContent = Number(value).toFixed(2);
  label.parentElement.classList.toggle("moved", moved);
  label.title = d === undefined ? "" : `model default ${Number(d).toFixed(2)}`;
}

// A threshold change is confirmed first: one stray click on a slider track
// would otherwise move it to the end of its range.
async function setThreshold(tag, value, slider, label) {
  const old = state.thresholds[tag];
  const ok = window.confirm(`Set the ${tag} threshold from ${Number(old).toFixed(2)} to ` +
    `${value.toFixed(2)}? It applies to the next frames.`);
  if (!ok) {
    slider.value = String(old);
    markThreshold(tag, slider, label, old);
    show("#threshold-result", `${tag} threshold left at ${Number(old).toFixed(2)}`, true);
    return;
  }
  try {
    const r = await call("PUT", "/api/thresholds", { thresholds: { [tag]: value } });
    applyThresholds(r);
    show("#threshold-result", `${tag} threshold is now ${r.thresholds[tag].toFixed(2)}`, true);
  } catch (e) {
    slider.value = String(old);
    markThreshold(tag, slider, label, old);
    show("#threshold-result", e.message, false);
  }
}

async function resetThresholds() {
  const changed = Object.fromEntries(state.tags.filter((t) => t in state.defaults &&
    Math.abs(state.thresholds[t] - state.defaults[t]) > 1e-6).map((t) => [t, state.defaults[t]]));
  const names = Object.keys(changed);
  if (!names.length) { show("#threshold-result", "all thresholds are at the model's defaults", true); return; }
  if (!window.confirm(`Reset ${names.length} threshold(s) to the model's defaults ` +
    `(${names.join(", ")})?`)) return;
  try {
    const r = await call("PUT", "/api/thresholds", { thresholds: changed });
    applyThresholds(r);
    show("#threshold-result", `reset ${names.join(", ")} to the model's defaults`, true);
  } catch (e) { show("#threshold-result", e.message, false); }
}

function applyThresholds(r) {
  state.thresholds = r.thresholds;
  if (r.defaults) state.defaults = r.defaults;
  document.querySelectorAll("#thresholds label.threshold").forEach((lab) => {
    const t = lab.dataset.tag;
    const s = lab.querySelector("input");
    s.value = String(state.thresholds[t]);
    markThreshold(t, s, lab.querySelector(".value"), state.thresholds[t]);
  });
  // past frames keep the tags they were given; only the bars' threshold ticks move
  document.querySelectorAll("#current-probs .prob").forEach((row) => {
    row.querySelector(".threshold").style.left =
      `${(100 * (state.thresholds[row.dataset.tag] ?? 0.5)).toFixed(2)}%`;
  });
}

// ----------------------------------------------------------------- model
async function refreshCheckpoints() {
  if (!state.finetune) return;
  const body = $("#checkpoints tbody");
  try {
    const r = await call("GET", "/api/checkpoints");
    body.replaceChildren();
    for (const c of r.checkpoints.slice().reverse()) {
      const tr = el("tr", c.checkpoint_id === r.active_id ? "active" : "");
      tr.dataset.id = c.checkpoint_id;
      tr.append(el("td", "", c.checkpoint_id), el("td", "", c.parent_id || ""),
        el("td", "", c.checkpoint_id === r.active_id ? "active" : (c.status || (c.promoted ? "promoted" : "kept"))),
        el("td", "", c.reason || ""));
      const td = el("td");
      if (c.checkpoint_id !== r.active_id) {
        const b = el("button", "secondary activate", "Activate");
        b.addEventListener("click", () => modelAction("POST", `/api/checkpoints/${c.checkpoint_id}/activate`, `activated ${c.checkpoint_id}`));
        td.append(b);
      }
      tr.append(td);
      body.append(tr);
    }
  } catch (e) {
    body.replaceChildren();
    if (needsKey(e)) lock();
    else show("#model-result", e.message, false);
  }
}

async function modelAction(method, path, done) {
  try {
    const r = await call(method, path);
    show("#model-result", done + (r && r.checkpoint_id ? ` (${r.checkpoint_id})` : ""), true);
    await loadTags();
    refreshCheckpoints();
    refreshStatus();
  } catch (e) { show("#model-result", e.message, false); }
}

// ------------------------------------------------------------------ feed
function connectFeed() {
  if (state.source) state.source.close();
  const src = new EventSource(`/api/feed?after=${state.lastId}`);
  state.source = src;
  src.addEventListener("frames", (ev) => addFrames(JSON.parse(ev.data).frames, true));
  src.addEventListener("run", (ev) => setRun(JSON.parse(ev.data)));
  src.addEventListener("decision", (ev) => {
    const m = JSON.parse(ev.data);
    setDecision(m.decision, m.where, m.policy);
  });
  // refused (401/403, 503): the browser gives up; find out why before one retry later
  src.addEventListener("error", () => {
    if (src.readyState !== EventSource.CLOSED || state.source !== src) return;
    refreshStatus().then(() => {
      if (!state.locked) setTimeout(() => { if (state.source === src) connectFeed(); }, 5000);
    });
  });
}

async function loadTags() {
  try {
    const th = await call("GET", "/api/thresholds");
    state.tags = th.tags;
    state.thresholds = th.thresholds;
    state.defaults = th.defaults || { ...th.thresholds };
    buildThresholds();
  } catch (e) {
    if (needsKey(e)) lock();
    else show("#threshold-result", e.message, false);
  }
}

// Read everything and open the live feed; stops at the first read that needs a key.
async function begin() {
  state.locked = false;
  state.keyRefused = (await openSession()) === false;
  await refreshStatus();   // first: it says whether fine-tuning is on
  if (state.locked) return;
  keyNotice();             // reads work; whether the key itself was refused
  await loadTags();
  if (state.locked) return;
  try {
    for (const r of (await call("GET", "/api/runs")).runs) state.runs.set(r.run_uid, r);
    const latest = await call("GET", "/api/frames/latest?n=" + TIMELINE_FRAMES);
    addFrames(latest.frames, false);
    state.lastId = Math.max(state.lastId, latest.last_id);
    const ds = await call("GET", "/api/decisions?n=" + HISTORY);
    state.history = ds.history.slice();
    setDecision(ds.current, null, undefined);
  } catch (e) {
    if (needsKey(e)) { lock(); return; }
    $("#status").textContent = e.message;
  }
  connectFeed();
}

async function start() {
  $("#send-labels").addEventListener("click", sendLabels);
  $("#close-editor").addEventListener("click", () => { $("#editor").hidden = true; });
  $("#retrain").addEventListener("click", () => modelAction("POST", "/api/retrain", "retraining started"));
  $("#rollback").addEventListener("click", () => modelAction("POST", "/api/checkpoints/rollback", "rolled back"));
  $("#reset-thresholds").addEventListener("click", resetThresholds);
  $("#current-live").addEventListener("click", backToLive);
  $("#key-input").addEventListener("change", keyChanged);
  await begin();
  setInterval(refreshStatus, 2000);
  setInterval(drawAges, 1000);
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", start);

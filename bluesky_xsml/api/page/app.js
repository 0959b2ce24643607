// The live page of the xsml steering service. No external libraries: it runs
// on machines without internet access. State-changing calls send the API key
// (from the URL fragment #key=..., or typed in) in the X-API-Key header.
"use strict";

const TIMELINE_FRAMES = 300;
const CARDS = 12;
const state = {
  tags: [], thresholds: {}, frames: [], lastId: -1, feedFrames: 0,
  selected: null, source: null,
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
    $("#key-input").addEventListener("change", () =>
      sessionStorage.setItem("xsml-key", apiKey()));
    if (key) sessionStorage.setItem("xsml-key", key);
  });
})();

async function call(method, path, body) {
  const opts = { method, headers: {} };
  if (method !== "GET") opts.headers["X-API-Key"] = apiKey();
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const msg = data && data.detail ? data.detail : r.statusText;
    throw new Error(`${r.status}: ${msg}`);
  }
  return data;
}

function show(target, text, ok) {
  const e = $(target);
  e.textContent = text;
  e.classList.toggle("error", !ok);
}

// ------------------------------------------------------------------- status
function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
function ms(x) { return x === null || x === undefined ? "–" : `${(1000 * x).toFixed(0)} ms`; }

async function refreshStatus() {
  try {
    const s = await call("GET", "/api/status");
    const skipped = Object.entries(s.skipped_by_reason).map(([k, v]) => `${k}:${v}`).join(" ");
    $("#status").textContent =
      `model ${s.checkpoint_id} on ${s.device} · ${fmt(s.frames_per_s, 1)} frames/s · ` +
      `latency p50 ${ms(s.latency_p50_s)} p99 ${ms(s.latency_p99_s)} · ` +
      `queue ${s.queue_jobs} · tagged ${s.frames_tagged} · skipped ${s.frames_skipped}` +
      (skipped ? ` (${skipped})` : "") +
      (s.finetune ? ` · fine-tune ${s.finetune.state}, ${s.finetune.labels} labels` : "");
    if (s.finetune) {
      $("#finetune-status").textContent =
        `fine-tuning ${s.finetune.state}: ${s.finetune.labels} labels, ` +
        `${s.finetune.labels_pending} not yet trained on, ${s.finetune.rounds} rounds, ` +
        `${s.finetune.promoted} promoted`;
    }
  } catch (e) {
    $("#status").textContent = `status unavailable (${e.message})`;
  }
}

// ---------------------------------------------------------------- decision
function showDecision(d) {
  const a = $("#decision-action");
  a.textContent = d.action;
  a.className = "action " + d.action;
  $("#decision-reason").textContent = d.reason;
  const ul = $("#decision-evidence");
  ul.replaceChildren();
  for (const f of (d.evidence || []).slice(-8)) {
    ul.append(el("li", "", `${f.stream} #${f.seq_num} ${f.key}: ` +
      (f.skip_reason ? `skipped (${f.skip_reason})` : f.tags.join(", ") || "no tags")));
  }
}

// ------------------------------------------------------------------- frames
function addFrames(frames, live) {
  for (const f of frames) {
    if (f.id <= state.lastId) continue;
    state.frames.push(f);
    state.lastId = f.id;
    if (live) state.feedFrames += 1;
  }
  if (state.frames.length > TIMELINE_FRAMES) state.frames.splice(0, state.frames.length - TIMELINE_FRAMES);
  $("#frame-count").textContent = String(state.feedFrames);
  drawTimeline();
  drawCards();
}

function drawTimeline() {
  const c = $("#timeline");
  const ctx = c.getContext("2d");
  const left = 130, rowH = Math.max(6, Math.floor((c.height - 4) / Math.max(1, state.tags.length)));
  c.height = rowH * state.tags.length + 4;
  ctx.fillStyle = "#0b0d10";
  ctx.fillRect(0, 0, c.width, c.height);
  const w = (c.width - left) / TIMELINE_FRAMES;
  ctx.font = `${Math.min(11, rowH)}px sans-serif`;
  ctx.textBaseline = "middle";
  state.tags.forEach((t, j) => {
    ctx.fillStyle = "#9aa3ad";
    ctx.fillText(t, 2, j * rowH + rowH / 2 + 2);
  });
  state.frames.forEach((f, i) => {
    const x = left + i * w;
    if (!f.probs) {
      ctx.fillStyle = "#553";
      ctx.fillRect(x, 2, Math.max(1, w - 0.5), c.height - 4);
      return;
    }
    state.tags.forEach((t, j) => {
      const p = f.probs[t];
      if (p === null || p === undefined) return;
      const on = p >= state.thresholds[t];
      ctx.fillStyle = on ? `rgba(250, 190, 40, ${0.55 + 0.45 * p})` : `rgba(80, 120, 200, ${0.6 * p})`;
      ctx.fillRect(x, j * rowH + 2, Math.max(1, w - 0.5), rowH - 1);
    });
  });
}

function frameTitle(f) { return `${f.stream} #${f.seq_num} ${f.key}` + (f.frame_index ? `[${f.frame_index}]` : ""); }

function thumbUrl(f) {
  const q = new URLSearchParams({ stream: f.stream, key: f.key, frame_index: f.frame_index, scale: 1 });
  return `/api/runs/${encodeURIComponent(f.run_uid)}/frames/${f.seq_num}/thumbnail.png?${q}`;
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
      const img = el("img");
      img.alt = frameTitle(f);
      img.loading = "lazy";
      if (f.probs) img.src = thumbUrl(f);
      card.append(img, el("div", "meta", frameTitle(f)));
      const chips = el("div", "chips");
      if (f.skip_reason) chips.append(el("span", "chip", "skipped: " + f.skip_reason));
      for (const t of f.tags) chips.append(el("span", "chip", t));
      card.append(chips);
      card.addEventListener("click", () => openEditor(f, card));
    }
    if (box.children[i] !== card) box.insertBefore(card, box.children[i] || null);
  });
}

// ------------------------------------------------------------------ editor
function openEditor(f, card) {
  state.selected = f;
  document.querySelectorAll(".frame-card.selected").forEach((c) => c.classList.remove("selected"));
  card.classList.add("selected");
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
    lab.append(cb, el("span", "", t), el("span", "value", p === null || p === undefined ? "" : p.toFixed(2)));
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
    const lab = el("label");
    const s = el("input");
    s.type = "range"; s.min = "0"; s.max = "1"; s.step = "0.01";
    s.value = String(state.thresholds[t]);
    s.dataset.tag = t;
    const v = el("span", "value", Number(state.thresholds[t]).toFixed(2));
    s.addEventListener("input", () => { v.textContent = Number(s.value).toFixed(2); });
    s.addEventListener("change", () => setThreshold(t, Number(s.value), s, v));
    lab.append(el("span", "", t), s, v);
    box.append(lab);
  }
}

async function setThreshold(tag, value, slider, label) {
  try {
    const r = await call("PUT", "/api/thresholds", { thresholds: { [tag]: value } });
    state.thresholds = r.thresholds;
    show("#threshold-result", `${tag} threshold is now ${r.thresholds[tag].toFixed(2)}`, true);
    drawTimeline();
  } catch (e) {
    slider.value = String(state.thresholds[tag]);
    label.textContent = Number(state.thresholds[tag]).toFixed(2);
    show("#threshold-result", e.message, false);
  }
}

// ----------------------------------------------------------------- model
async function refreshCheckpoints() {
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
    show("#model-result", e.message, false);
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
  src.addEventListener("decision", (ev) => showDecision(JSON.parse(ev.data).decision));
}

async function loadTags() {
  try {
    const th = await call("GET", "/api/thresholds");
    state.tags = th.tags;
    state.thresholds = th.thresholds;
    buildThresholds();
  } catch (e) { show("#threshold-result", e.message, false); }
}

async function start() {
  $("#send-labels").addEventListener("click", sendLabels);
  $("#close-editor").addEventListener("click", () => { $("#editor").hidden = true; });
  $("#retrain").addEventListener("click", () => modelAction("POST", "/api/retrain", "retraining started"));
  $("#rollback").addEventListener("click", () => modelAction("POST", "/api/checkpoints/rollback", "rolled back"));
  await loadTags();
  try {
    const latest = await call("GET", "/api/frames/latest?n=" + TIMELINE_FRAMES);
    addFrames(latest.frames, false);
    state.lastId = Math.max(state.lastId, latest.last_id);
    showDecision(await call("GET", "/api/decision"));
  } catch (e) { $("#status").textContent = e.message; }
  connectFeed();
  refreshStatus();
  refreshCheckpoints();
  setInterval(refreshStatus, 2000);
  setInterval(refreshCheckpoints, 10000);
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", start);

// The review page: a list of recent inspections, a viewer for one, the score panel and drift.
// Plain script, no library: the box is offline. Every call goes to /v1/review/* with the bearer token
// (asked once, kept for the browser tab); images are fetched with it and shown from blob URLs.
"use strict";

const state = {
  token: sessionStorage.getItem("hiad-token") || "",
  filter: "all",
  items: [],       // the list as shown
  thumbs: new Map(), // id -> blob URL
  summary: null,
  dragged: null,   // the operator's threshold
  current: null,   // the record in the viewer
  view: { k: 1, x: 0, y: 0 },
};
const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const answer = await fetch(path, { ...options, headers });
  if (answer.status === 401) {
    $("login").hidden = false;
    throw new Error("token needed");
  }
  if (!answer.ok) throw new Error(path + ": " + answer.status + " " + (await answer.text()));
  return answer;
}

async function blobUrl(path) {
  return URL.createObjectURL(await (await api(path)).blob());
}

// ---- list ----------------------------------------------------------------------------------------

async function refreshList() {
  const data = await (await api(`/v1/review/items?filter=${state.filter}&limit=100`)).json();
  state.items = data.items;
  $("count").textContent = `${data.items.length} shown of ${data.total} kept`;
  const rows = $("rows");
  const fresh = [];
  for (const item of data.items) {
    const row = document.createElement("tr");
    row.dataset.id = item.id;
    row.innerHTML =
      `<td><img alt=""></td><td>${item.time.slice(0, 19).replace("T", " ")}</td><td></td>` +
      `<td>${item.score.toFixed(4)}</td><td class="${item.decision || ""}">${item.decision || "–"}</td>` +
      `<td>${item.latency_ms.toFixed(0)} ms</td><td class="label">${item.label ? item.label.label : ""}</td>`;
    row.children[2].textContent = item.file || "";
    row.addEventListener("click", () => openViewer(item.id));
    fresh.push([row, item]);
  }
  rows.replaceChildren(...fresh.map(([row]) => row));
  for (const [row, item] of fresh) {
    if (!item.thumb) continue;
    if (!state.thumbs.has(item.id)) state.thumbs.set(item.id, await blobUrl(`/v1/review/items/${item.id}/thumb`));
    row.querySelector("img").src = state.thumbs.get(item.id);
  }
}

// ---- score panel ---------------------------------------------------------------------------------

function gumbelCdf(ref, s) {
  return Math.exp(-ref.tiles * Math.exp(-Math.max((s - ref.loc) / ref.scale, -50)));
}

function errorsAt(scores, t) {
  let falseAlarms = 0, good = 0, misses = 0, defects = 0;
  for (const [score, , label] of scores) {
    if (label === "good") { good++; if (score >= t) falseAlarms++; }
    if (label === "defect") { defects++; if (score < t) misses++; }
  }
  return [`${falseAlarms} / ${good}`, `${misses} / ${defects}`];
}

function drawPanel() {
  const s = state.summary;
  if (!s) return;
  const scores = s.scores, current = s.thresholds.image;
  const values = scores.map((x) => x[0]);
  const ref = s.drift.reference;
  let lo = Math.min(...values, current ?? Infinity), hi = Math.max(...values, current ?? -Infinity);
  if (!isFinite(lo)) { lo = 0; hi = 1; }
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.05; lo -= pad; hi += pad;
  const slider = $("drag");
  slider.min = lo; slider.max = hi; slider.step = (hi - lo) / 1000;
  if (state.dragged === null) state.dragged = current ?? (lo + hi) / 2;
  slider.value = state.dragged;

  const canvas = $("hist"), g = canvas.getContext("2d"), W = canvas.width, H = canvas.height - 14, bins = 40;
  const x = (v) => ((v - lo) / (hi - lo)) * W;
  const pass = new Array(bins).fill(0), flag = new Array(bins).fill(0);
  for (const [score, decision] of scores) {
    const b = Math.min(bins - 1, Math.max(0, Math.floor(((score - lo) / (hi - lo)) * bins)));
    (decision === "flag" ? flag : pass)[b]++;
  }
  const expected = ref ? [...Array(bins).keys()].map((b) =>
    values.length * (gumbelCdf(ref, lo + ((b + 1) * (hi - lo)) / bins) - gumbelCdf(ref, lo + (b * (hi - lo)) / bins))) : [];
  const top = Math.max(1, ...pass.map((p, b) => p + flag[b]), ...expected);
  g.clearRect(0, 0, canvas.width, canvas.height);
  for (let b = 0; b < bins; b++) {
    const x0 = (b * W) / bins, w = W / bins - 1;
    const hp = (pass[b] / top) * H, hf = (flag[b] / top) * H;
    g.fillStyle = "#66bb6a"; g.fillRect(x0, H - hp, w, hp);
    g.fillStyle = "#ef5350"; g.fillRect(x0, H - hp - hf, w, hf);
  }
  if (ref) {
    g.strokeStyle = "#1e88e5"; g.lineWidth = 2; g.beginPath();
    expected.forEach((e, b) => g.lineTo(((b + 0.5) * W) / bins, H - (e / top) * H));
    g.stroke();
  }
  const vline = (v, color) => { g.strokeStyle = color; g.lineWidth = 2; g.beginPath(); g.moveTo(x(v), 0); g.lineTo(x(v), H); g.stroke(); };
  if (current !== null) vline(current, "#000");
  vline(state.dragged, "#ff9800");
  g.fillStyle = "#555"; g.font = "11px sans-serif";
  g.fillText(lo.toFixed(3), 0, canvas.height - 2);
  g.fillText(hi.toFixed(3), W - 40, canvas.height - 2);

  $("drag-value").textContent = Number(state.dragged).toFixed(4);
  const [faCur, missCur] = current === null ? ["–", "–"] : errorsAt(scores, current);
  const [faDrag, missDrag] = errorsAt(scores, state.dragged);
  $("t-cur").textContent = current === null ? "none" : current.toFixed(4);
  $("fa-cur").textContent = faCur; $("miss-cur").textContent = missCur;
  $("t-drag").textContent = Number(state.dragged).toFixed(4);
  $("fa-drag").textContent = faDrag; $("miss-drag").textContent = missDrag;
}

function showDrift(d) {
  const badge = $("drift");
  badge.className = "badge " + d.level;
  badge.textContent = `drift: ${d.level}` + (d.distance === null ? "" : ` (KS ${d.distance.toFixed(3)})`);
  $("drift-text").textContent = d.reference
    ? `${d.statistic}: D = ${d.distance === null ? "–" : d.distance.toFixed(3)} over the last ${d.scores} ` +
      `scores (window ${d.window}); warn above ${d.thresholds.warn}, alarm above ${d.thresholds.alarm} ` +
      `(and above the 5 % / 1 % critical values). Reference: ${d.reference.source}.`
    : `No reference: the bundle records no normal-score law (its image threshold records no Gumbel fit of normal images, e.g. rule f1); ` +
      `${d.scores} scores in the window.`;
}

async function refreshSummary() {
  state.summary = await (await api("/v1/review/summary?limit=1000")).json();
  $("bundle").textContent = state.summary.bundle_id || "";
  showDrift(state.summary.drift);
  drawPanel();
}

async function refresh() {
  try {
    await refreshList();
    await refreshSummary();
    $("login").hidden = true;
  } catch (e) {
    console.warn(e);
  }
}

// ---- viewer --------------------------------------------------------------------------------------

async function openViewer(id) {
  const record = await (await api(`/v1/review/items/${id}`)).json();
  state.current = record;
  $("viewer").dataset.ready = "0";
  $("viewer").hidden = false;
  $("viewer").dataset.id = id;
  $("current-label").textContent = record.label ? `labeled ${record.label.label} by ${record.label.who}` : "unlabeled";
  $("note").value = "";
  $("facts").textContent =
    `${record.file || record.id}  score ${record.score.toFixed(4)}  ${record.decision || ""}  ` +
    `${record.width}×${record.height}  ${record.latency_ms.toFixed(0)} ms`;
  const img = $("image");
  const loaded = new Promise((resolve) => (img.onload = resolve));
  img.src = await blobUrl(`/v1/review/items/${id}/image`);
  await loaded;
  const world = $("world");
  world.style.width = img.naturalWidth + "px";
  world.style.height = img.naturalHeight + "px";
  fit();
  await drawMap(record);
  $("viewer").dataset.ready = "1";
}

async function drawMap(record) {
  const heat = $("heat"), contour = $("contour");
  for (const c of [heat, contour]) c.getContext("2d").clearRect(0, 0, c.width, c.height);
  if (!record.map_range) return;
  const img = new Image();
  const loaded = new Promise((resolve) => (img.onload = resolve));
  img.src = await blobUrl(`/v1/review/items/${record.id}/map`);
  await loaded;
  const w = img.naturalWidth, h = img.naturalHeight;
  for (const c of [heat, contour]) { c.width = w; c.height = h; }
  const scratch = document.createElement("canvas");
  scratch.width = w; scratch.height = h;
  const sg = scratch.getContext("2d");
  sg.drawImage(img, 0, 0);
  const pixels = sg.getImageData(0, 0, w, h).data;
  const [lo, hi] = record.map_range, pt = record.pixel_threshold;
  const score = (i) => lo + (pixels[4 * i] / 255) * (hi - lo);
  // heat: clear below half the pixel threshold, red from 1.5 times it (the mask's edge is half-way); without a
  // pixel threshold, the map's own range
  const [a, b] = pt !== null && pt > 0 ? [0.5 * pt, 1.5 * pt] : [lo, hi];
  const heatData = heat.getContext("2d").createImageData(w, h), contourData = contour.getContext("2d").createImageData(w, h);
  const inMask = new Uint8Array(w * h);
  for (let i = 0; i < w * h; i++) {
    const t = Math.min(1, Math.max(0, (score(i) - a) / Math.max(b - a, 1e-12)));
    heatData.data.set([255 * Math.min(1, 2 * t), 255 * (1 - Math.abs(2 * t - 1)), 255 * Math.max(0, 1 - 2 * t), t > 0 ? 90 + 165 * t : 0], 4 * i);
    if (pt !== null) inMask[i] = score(i) >= pt ? 1 : 0;
  }
  if (pt !== null) {
    for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
      const i = y * w + x;
      if (!inMask[i]) continue;
      const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 || !inMask[i - 1] || !inMask[i + 1] || !inMask[i - w] || !inMask[i + w];
      if (edge) contourData.data.set([255, 255, 255, 255], 4 * i);
    }
  }
  heat.getContext("2d").putImageData(heatData, 0, 0);
  contour.getContext("2d").putImageData(contourData, 0, 0);
}

function applyView() {
  const v = state.view;
  $("world").style.transform = `translate(${v.x}px, ${v.y}px) scale(${v.k})`;
}

function fit() {
  const stage = $("stage").getBoundingClientRect(), img = $("image");
  const k = Math.min(stage.width / img.naturalWidth, stage.height / img.naturalHeight);
  state.view = { k, x: (stage.width - img.naturalWidth * k) / 2, y: (stage.height - img.naturalHeight * k) / 2 };
  applyView();
}

function zoomAt(factor, cx, cy) {
  const v = state.view, k = Math.min(32, Math.max(0.02, v.k * factor));
  state.view = { k, x: cx - ((cx - v.x) * k) / v.k, y: cy - ((cy - v.y) * k) / v.k };
  applyView();
}

async function mark(label) {
  const record = state.current;
  if (!record) return;
  const body = JSON.stringify({ label, who: $("who").value || "operator", note: $("note").value });
  const saved = await (await api(`/v1/review/items/${record.id}/label`, { method: "POST", body, headers: { "Content-Type": "application/json" } })).json();
  record.label = saved;
  $("current-label").textContent = `labeled ${saved.label} by ${saved.who}`;
  refresh();
}

function step(delta) {
  const index = state.items.findIndex((item) => item.id === state.current?.id);
  const next = state.items[index + delta];
  if (next) openViewer(next.id);
}

function closeViewer() {
  $("viewer").hidden = true;
  state.current = null;
  refresh();
}

// ---- wiring --------------------------------------------------------------------------------------

$("who").value = localStorage.getItem("hiad-who") || "";
$("who").addEventListener("change", () => localStorage.setItem("hiad-who", $("who").value));
$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem("hiad-token", state.token);
  refresh();
});
for (const button of document.querySelectorAll("#filters button")) {
  button.addEventListener("click", () => {
    document.querySelectorAll("#filters button").forEach((b) => b.classList.toggle("on", b === button));
    state.filter = button.dataset.filter;
    refreshList().catch(console.warn);
  });
}
$("drag").addEventListener("input", () => { state.dragged = Number($("drag").value); drawPanel(); });
$("back").addEventListener("click", closeViewer);
$("prev").addEventListener("click", () => step(-1));
$("next").addEventListener("click", () => step(1));
$("fit").addEventListener("click", fit);
$("full").addEventListener("click", () => { const r = $("stage").getBoundingClientRect(); zoomAt(1 / state.view.k, r.width / 2, r.height / 2); });
$("mark-good").addEventListener("click", () => mark("good"));
$("mark-defect").addEventListener("click", () => mark("defect"));
$("show-heat").addEventListener("change", () => ($("heat").hidden = !$("show-heat").checked));
$("show-contour").addEventListener("change", () => ($("contour").hidden = !$("show-contour").checked));

const stage = $("stage");
stage.addEventListener("wheel", (event) => {
  event.preventDefault();
  const r = stage.getBoundingClientRect();
  zoomAt(event.deltaY < 0 ? 1.25 : 0.8, event.clientX - r.left, event.clientY - r.top);
}, { passive: false });
stage.addEventListener("pointerdown", (event) => {
  const start = { x: event.clientX - state.view.x, y: event.clientY - state.view.y };
  stage.setPointerCapture(event.pointerId);
  const move = (e) => { state.view.x = e.clientX - start.x; state.view.y = e.clientY - start.y; applyView(); };
  stage.addEventListener("pointermove", move);
  stage.addEventListener("pointerup", () => stage.removeEventListener("pointermove", move), { once: true });
});

document.addEventListener("keydown", (event) => {
  if ($("viewer").hidden || event.target.tagName === "INPUT") return;
  const keys = {
    g: () => mark("good"), d: () => mark("defect"),
    j: () => step(1), ArrowRight: () => step(1), k: () => step(-1), ArrowLeft: () => step(-1),
    h: () => $("show-heat").click(), c: () => $("show-contour").click(),
    f: fit, 1: () => $("full").click(), Escape: closeViewer,
    "+": () => { const r = stage.getBoundingClientRect(); zoomAt(1.25, r.width / 2, r.height / 2); },
    "-": () => { const r = stage.getBoundingClientRect(); zoomAt(0.8, r.width / 2, r.height / 2); },
  };
  if (keys[event.key]) { event.preventDefault(); keys[event.key](); }
});

refresh();
setInterval(() => { if ($("viewer").hidden) refresh(); }, 3000);

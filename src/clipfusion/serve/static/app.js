// clipfusion inspector: plain JavaScript, no library, no request outside this server.
//
// Each image is sent once (POST /v1/detectors/{name}/predict?overlay=false); the page keeps the raw
// float32 anomaly map it gets back, so moving a threshold re-decides every image and redraws every mask
// here, without asking the server again.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  detectors: [],
  detector: null, // the chosen detector's description (GET /v1/detectors)
  token: sessionStorage.getItem("clipfusion-token") || "",
  items: [], // {id, file, name, url, img, status, error, score, map, mapW, mapH, heat, masked}
  nextId: 1,
  imageT: null,
  pixelT: null,
  handSet: false, // thresholds moved away from the calibrated ones
  vmin: 0,
  vmax: 1,
  queue: [],
  running: 0,
  viewing: null,
};
const CONCURRENCY = 2;
const JET = [
  [0.0, 0.0, 0.0, 0.5], [0.11, 0.0, 0.0, 1.0], [0.34, 0.0, 1.0, 1.0],
  [0.65, 1.0, 1.0, 0.0], [0.89, 1.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0],
]; // the colour map of the report's overlays (clipfusion.outputs.report)

// -- talking to the server ----------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = "Bearer " + state.token;
  return fetch(path, Object.assign({}, options, { headers }));
}

async function errorText(res) {
  try {
    const body = await res.json();
    return body.error || res.statusText;
  } catch (_) {
    return res.status + " " + res.statusText;
  }
}

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function loadDetectors() {
  let res;
  try {
    res = await api("/v1/detectors");
  } catch (err) {
    setStatus("cannot reach the server: " + err, true);
    return;
  }
  if (res.status === 401) {
    $("token-box").hidden = false;
    setStatus(state.token ? "the token was refused: " + (await errorText(res)) : "this server needs a token", true);
    return;
  }
  if (!res.ok) {
    setStatus(await errorText(res), true);
    return;
  }
  $("token-box").hidden = true;
  const body = await res.json();
  state.detectors = body.detectors;
  const select = $("detector");
  const chosen = state.detector ? state.detector.name : select.value;
  select.replaceChildren();
  for (const d of state.detectors) {
    const option = document.createElement("option");
    option.value = d.name;
    option.textContent = d.name + (d.state === "ready" ? "" : " (" + d.state + ")");
    select.append(option);
  }
  const keep = state.detectors.find((d) => d.name === chosen);
  const first = keep || state.detectors.find((d) => d.state === "ready") || state.detectors[0];
  if (first) {
    select.value = first.name;
    chooseDetector(first.name, !keep);
  }
  if (state.detectors.some((d) => d.state === "loading" || d.state === "waiting")) {
    setTimeout(loadDetectors, 2000);
  }
}

function chooseDetector(name, fresh) {
  const d = state.detectors.find((x) => x.name === name);
  const changed = !state.detector || state.detector.name !== name;
  state.detector = d;
  const banner = $("banner");
  banner.hidden = !d.banner;
  banner.textContent = d.banner || "";
  const shots = d.shots ? d.shots + "-shot" : "zero-shot";
  const t = d.thresholds
    ? (d.thresholds.origin === "set by hand" ? "thresholds " : "calibrated thresholds ") +
      fmt(d.thresholds.image) + " / pixel " + fmt(d.thresholds.pixel)
    : "no calibrated thresholds";
  $("detector-info").textContent =
    "“" + d.object_name + "”, " + shots + ", " + d.weights + " weights, " + t +
    (d.state === "ready" ? "" : " — " + d.state + (d.error ? ": " + d.error : ""));
  if (d.state === "failed") setStatus("detector " + d.name + " could not be loaded: " + d.error, true);
  else if (d.state !== "ready") setStatus("detector " + d.name + " is loading…");
  else if ($("status").textContent.startsWith("detector")) setStatus("");
  if (changed || fresh) {
    state.handSet = false;
    state.imageT = d.thresholds ? d.thresholds.image : null;
    state.pixelT = d.thresholds ? d.thresholds.pixel : null;
    // scores of another detector mean nothing here: score the same files again
    const files = state.items.map((it) => it.file);
    clearItems();
    if (files.length && d.state === "ready") addFiles(files);
  }
  updateAll();
}

// -- scoring ------------------------------------------------------------------------------------------

function addFiles(files) {
  if (!state.detector) {
    setStatus("no detector to send the images to", true);
    return;
  }
  for (const file of files) {
    const item = { id: state.nextId++, file, name: file.name, url: URL.createObjectURL(file), status: "pending" };
    state.items.push(item);
    state.queue.push(item);
  }
  updateAll();
  pump();
}

function pump() {
  while (state.running < CONCURRENCY && state.queue.length) {
    const item = state.queue.shift();
    state.running++;
    score(item).finally(() => {
      state.running--;
      pump();
    });
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function score(item) {
  const detector = state.detector;
  const url = "/v1/detectors/" + encodeURIComponent(detector.name) + "/predict?overlay=false";
  for (let attempt = 0; attempt < 30; attempt++) {
    const form = new FormData();
    form.append("images", item.file, item.name);
    let res;
    try {
      res = await api(url, { method: "POST", body: form });
    } catch (err) {
      return fail(item, "network error: " + err);
    }
    if (res.status === 503) {
      // busy or loading: come back when the server says
      const wait = Math.min(10, Number(res.headers.get("Retry-After") || 2));
      item.error = "server busy, retrying in " + wait + " s";
      renderGrid();
      await sleep(wait * 1000);
      continue;
    }
    if (!res.ok) return fail(item, await errorText(res));
    const body = await res.json();
    if (!state.items.includes(item) || state.detector !== detector) return; // cleared meanwhile
    const r = body.results[0];
    item.score = r.score;
    item.map = decodeMap(r.anomaly_map);
    [item.mapH, item.mapW] = r.anomaly_map.shape;
    item.img = await loadImage(item.url);
    item.status = "ready";
    item.error = null;
    updateAll();
    return;
  }
  fail(item, "server still busy; gave up");
}

function fail(item, message) {
  item.status = "failed";
  item.error = message;
  updateAll();
}

function decodeMap(encoded) {
  // base64 of little-endian float32 values (see the API page, schema EncodedMap)
  const bin = atob(encoded.data);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const view = new DataView(bytes.buffer);
  const out = new Float32Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(i * 4, true);
  return out;
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot show this image"));
    img.src = url;
  }).catch(() => null);
}

// -- thresholds -----------------------------------------------------------------------------------------

function ready() {
  return state.items.filter((it) => it.status === "ready");
}

function decide(item) {
  return state.imageT === null ? null : item.score > state.imageT ? "anomalous" : "normal";
}

function ranges() {
  const items = ready();
  const scores = items.map((it) => it.score);
  let smin = Math.min(...scores), smax = Math.max(...scores);
  let pmin = Infinity, pmax = -Infinity;
  for (const it of items) {
    for (const v of it.map) {
      if (v < pmin) pmin = v;
      if (v > pmax) pmax = v;
    }
  }
  const t = state.detector && state.detector.thresholds;
  if (t) {
    smin = Math.min(smin, t.image); smax = Math.max(smax, t.image);
    pmin = Math.min(pmin, t.pixel); pmax = Math.max(pmax, t.pixel);
  }
  const pad = (lo, hi) => {
    const span = hi - lo || Math.abs(hi) * 0.1 || 1;
    return [lo - 0.05 * span, hi + 0.05 * span];
  };
  return { score: pad(smin, smax), pixel: pad(pmin, pmax), map: [pmin, pmax] };
}

function setupSlider(input, output, range, value) {
  input.min = range[0];
  input.max = range[1];
  input.step = (range[1] - range[0]) / 1000;
  input.value = value;
  input.disabled = false;
  output.textContent = fmt(value);
}

function updateThresholdControls() {
  const items = ready();
  const img = $("image-threshold"), pix = $("pixel-threshold");
  if (!items.length) {
    img.disabled = pix.disabled = true;
    $("image-threshold-value").textContent = state.imageT === null ? "–" : fmt(state.imageT);
    $("pixel-threshold-value").textContent = state.pixelT === null ? "–" : fmt(state.pixelT);
    return;
  }
  const r = ranges();
  state.vmin = r.map[0];
  state.vmax = r.map[1];
  // without calibrated thresholds, start in the middle of what was seen; the user moves them
  if (state.imageT === null) state.imageT = (r.score[0] + r.score[1]) / 2;
  if (state.pixelT === null) state.pixelT = (r.map[0] + r.map[1]) / 2;
  setupSlider(img, $("image-threshold-value"), r.score, state.imageT);
  setupSlider(pix, $("pixel-threshold-value"), r.pixel, state.pixelT);
  const t = state.detector && state.detector.thresholds;
  $("reset-thresholds").disabled = !t;
  $("threshold-origin").textContent = t
    ? (state.handSet ? "set by hand" : origin(t))
    : "set by hand (no calibrated thresholds)";
}

function origin(t) {
  // the detector's own thresholds, as its thresholds.json says they were made
  if (t.origin === "set by hand") return "saved with the detector, " + t.set_by_hand.join(" and ") + " set by hand";
  return "calibrated (quantile " + t.quantile + ", " + t.n_images + " normal images)";
}

function onThreshold(event) {
  // only the slider that moved: the other keeps its exact value (a slider's own value is rounded to its
  // step, so reading both would nudge a calibrated threshold the user never touched)
  const value = Number(event.target.value);
  if (event.target.id === "image-threshold") state.imageT = value;
  else state.pixelT = value;
  state.handSet = true;
  $("image-threshold-value").textContent = fmt(state.imageT);
  $("pixel-threshold-value").textContent = fmt(state.pixelT);
  const t = state.detector && state.detector.thresholds;
  $("threshold-origin").textContent = t ? "set by hand" : "set by hand (no calibrated thresholds)";
  for (const it of ready()) it.outline = null;
  renderGrid();
  drawHistogram();
  if (state.viewing) drawViewer();
}

// -- drawing --------------------------------------------------------------------------------------------

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return Math.abs(v) >= 1000 || (Math.abs(v) < 0.001 && v !== 0) ? v.toExponential(3) : v.toFixed(4);
}

function jet(v) {
  v = Math.min(1, Math.max(0, Number.isFinite(v) ? v : 0));
  let k = 1;
  while (k < JET.length - 1 && JET[k][0] < v) k++;
  const a = JET[k - 1], b = JET[k];
  const f = (v - a[0]) / (b[0] - a[0] || 1);
  return [0, 1, 2].map((c) => Math.round(255 * (a[c + 1] + f * (b[c + 1] - a[c + 1]))));
}

function heatCanvas(item) {
  // the map coloured on the set's scale (like the report's default), at the map's own size
  const key = state.vmin + ":" + state.vmax;
  if (item.heat && item.heatKey === key) return item.heat;
  const c = document.createElement("canvas");
  c.width = item.mapW;
  c.height = item.mapH;
  const ctx = c.getContext("2d");
  const data = ctx.createImageData(item.mapW, item.mapH);
  const span = state.vmax - state.vmin || 1;
  for (let i = 0; i < item.map.length; i++) {
    const [r, g, b] = jet((item.map[i] - state.vmin) / span);
    data.data[4 * i] = r;
    data.data[4 * i + 1] = g;
    data.data[4 * i + 2] = b;
    data.data[4 * i + 3] = 255;
  }
  ctx.putImageData(data, 0, 0);
  item.heat = c;
  item.heatKey = key;
  return c;
}

function outline(item) {
  // boundary segments of {map > pixel threshold}, in map cells: crisp at any display size
  if (item.outline && item.outlineT === state.pixelT) return item.outline;
  const { mapW: w, mapH: h, map } = item;
  const t = state.pixelT;
  const inside = (x, y) => x >= 0 && y >= 0 && x < w && y < h && map[y * w + x] > t;
  const segs = [];
  let masked = 0;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (!inside(x, y)) continue;
      masked++;
      if (!inside(x, y - 1)) segs.push(x, y, x + 1, y);
      if (!inside(x, y + 1)) segs.push(x, y + 1, x + 1, y + 1);
      if (!inside(x - 1, y)) segs.push(x, y, x, y + 1);
      if (!inside(x + 1, y)) segs.push(x + 1, y, x + 1, y + 1);
    }
  }
  item.outline = segs;
  item.outlineT = t;
  item.masked = masked;
  return segs;
}

function drawOverlay(canvas, item, opacity, withOutline, maxW, maxH) {
  const iw = item.img ? item.img.naturalWidth : item.mapW;
  const ih = item.img ? item.img.naturalHeight : item.mapH;
  const scale = Math.min(maxW / iw, maxH / ih);
  canvas.width = Math.max(1, Math.round(iw * scale));
  canvas.height = Math.max(1, Math.round(ih * scale));
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  if (item.img) ctx.drawImage(item.img, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = opacity;
  // the map covers the whole image (the models see it resized, not cropped)
  ctx.drawImage(heatCanvas(item), 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
  const segs = outline(item);
  if (withOutline && segs.length) {
    const sx = canvas.width / item.mapW, sy = canvas.height / item.mapH;
    ctx.beginPath();
    for (let i = 0; i < segs.length; i += 4) {
      ctx.moveTo(segs[i] * sx, segs[i + 1] * sy);
      ctx.lineTo(segs[i + 2] * sx, segs[i + 3] * sy);
    }
    ctx.lineWidth = Math.max(1.5, canvas.width / 300);
    ctx.strokeStyle = "rgba(0,0,0,0.8)";
    ctx.lineWidth += 1.5;
    ctx.stroke();
    ctx.strokeStyle = "#ff2bd6";
    ctx.lineWidth -= 1.5;
    ctx.stroke();
  }
}

function renderGrid() {
  const grid = $("grid");
  const sorted = state.items.slice().sort((a, b) => {
    const ra = a.status === "ready", rb = b.status === "ready";
    if (ra !== rb) return ra ? -1 : 1;
    return ra ? b.score - a.score : a.id - b.id;
  });
  const cards = [];
  sorted.forEach((item, index) => {
    const card = document.createElement("div");
    card.className = "card " + item.status;
    card.dataset.name = item.name;
    card.dataset.status = item.status;
    const line = document.createElement("div");
    line.className = "line";
    if (item.status === "ready") {
      const canvas = document.createElement("canvas");
      drawOverlay(canvas, item, 0.5, true, 230, 230);
      const decision = decide(item);
      card.dataset.decision = decision || "";
      card.dataset.score = item.score;
      card.dataset.masked = item.masked;
      card.dataset.ready = "true";
      card.title = "click for a large view";
      card.addEventListener("click", () => openViewer(item));
      card.append(canvas);
      line.innerHTML = "";
      const rank = document.createElement("span");
      rank.textContent = "#" + (index + 1);
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = fmt(item.score);
      line.append(rank, score);
      if (decision) {
        const d = document.createElement("span");
        d.className = decision;
        d.textContent = decision;
        line.append(d);
      }
    } else {
      const note = document.createElement("span");
      note.className = item.status === "failed" ? "error" : "meta";
      note.textContent = item.status === "failed" ? item.error : item.error || "scoring…";
      line.append(note);
    }
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = item.name;
    card.append(line, name);
    cards.push(card);
  });
  grid.replaceChildren(...cards);
}

function drawHistogram() {
  const canvas = $("histogram");
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = 18;
  ctx.clearRect(0, 0, W, H);
  const items = ready();
  const summary = $("summary");
  if (!items.length) {
    summary.textContent = state.items.length ? "scoring…" : "no images yet";
    canvas.dataset.threshold = "";
    return;
  }
  const [lo, hi] = ranges().score;
  const bins = 24;
  // per bin, the images called normal (green, below) and anomalous (red, stacked above)
  const normal = new Array(bins).fill(0), anomalous = new Array(bins).fill(0);
  for (const it of items) {
    const b = Math.min(bins - 1, Math.max(0, Math.floor(((it.score - lo) / (hi - lo)) * bins)));
    if (decide(it) === "anomalous") anomalous[b]++;
    else normal[b]++;
  }
  const top = Math.max(...normal.map((n, b) => n + anomalous[b]));
  const bw = (W - 2 * pad) / bins, unit = (H - 2 * pad) / top;
  for (let b = 0; b < bins; b++) {
    ctx.fillStyle = "#5cb85c";
    ctx.fillRect(pad + b * bw + 1, H - pad - normal[b] * unit, bw - 2, normal[b] * unit);
    ctx.fillStyle = "#d9534f";
    ctx.fillRect(pad + b * bw + 1, H - pad - (normal[b] + anomalous[b]) * unit, bw - 2, anomalous[b] * unit);
  }
  ctx.strokeStyle = "#999";
  ctx.beginPath();
  ctx.moveTo(pad, H - pad + 0.5);
  ctx.lineTo(W - pad, H - pad + 0.5);
  ctx.stroke();
  ctx.fillStyle = "#555";
  ctx.font = "11px sans-serif";
  ctx.textAlign = "left";
  ctx.fillText(fmt(lo), pad, H - 4);
  ctx.textAlign = "right";
  ctx.fillText(fmt(hi), W - pad, H - 4);
  if (state.imageT !== null) {
    const x = pad + ((state.imageT - lo) / (hi - lo)) * (W - 2 * pad);
    ctx.strokeStyle = "#111";
    ctx.lineWidth = 2;
    ctx.setLineDash([5, 3]);
    ctx.beginPath();
    ctx.moveTo(x, 4);
    ctx.lineTo(x, H - pad);
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.lineWidth = 1;
    ctx.textAlign = "center";
    ctx.fillText("threshold " + fmt(state.imageT), Math.min(W - 60, Math.max(60, x)), 12);
  }
  canvas.dataset.threshold = state.imageT;
  const flagged = items.filter((it) => decide(it) === "anomalous").length;
  const pending = state.items.length - items.length;
  summary.textContent =
    items.length + " image" + (items.length === 1 ? "" : "s") + " scored, " + flagged +
    " anomalous at threshold " + fmt(state.imageT) + (pending ? " (" + pending + " more not scored)" : "");
}

function openViewer(item) {
  state.viewing = item;
  $("viewer").showModal();
  drawViewer();
}

function drawViewer() {
  const item = state.viewing;
  if (!item) return;
  const maxW = Math.min(window.innerWidth * 0.88, 1400), maxH = window.innerHeight * 0.72;
  drawOverlay($("viewer-canvas"), item, Number($("opacity").value), $("outline").checked, maxW, maxH);
  const decision = decide(item);
  $("viewer-title").textContent = item.name;
  $("viewer-info").textContent =
    "score " + fmt(item.score) + (decision ? " · " + decision : "") + " · " +
    ((100 * item.masked) / (item.mapW * item.mapH)).toFixed(2) + " % of pixels above " + fmt(state.pixelT);
}

function updateAll() {
  updateThresholdControls();
  renderGrid();
  drawHistogram();
  const any = ready().length > 0;
  $("export-csv").disabled = !any;
  $("export-thresholds").disabled = !any;
  $("clear").disabled = state.items.length === 0;
}

function clearItems() {
  for (const it of state.items) URL.revokeObjectURL(it.url);
  state.items = [];
  state.queue = [];
}

// -- export ---------------------------------------------------------------------------------------------

function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function csvField(value) {
  const s = String(value);
  return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
}

function exportCsv() {
  const rows = [["file", "score", "decision", "anomalous_pixels", "weights"]];
  const items = ready().slice().sort((a, b) => b.score - a.score);
  for (const it of items) {
    outline(it);
    rows.push([it.name, it.score, decide(it) || "", (it.masked / (it.mapW * it.mapH)).toFixed(6), state.detector.weights]);
  }
  download("scores.csv", rows.map((r) => r.map(csvField).join(",")).join("\n") + "\n", "text/csv");
}

async function exportThresholds() {
  // the server writes it (clipfusion.calibration.Thresholds), so `clipfusion predict --thresholds` reads it
  const res = await api("/v1/detectors/" + encodeURIComponent(state.detector.name) + "/thresholds", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ image: state.imageT, pixel: state.pixelT }),
  });
  if (!res.ok) {
    setStatus("export failed: " + (await errorText(res)), true);
    return;
  }
  download("thresholds.json", JSON.stringify(await res.json(), null, 2) + "\n", "application/json");
}

// -- wiring ---------------------------------------------------------------------------------------------

function init() {
  $("detector").addEventListener("change", (e) => chooseDetector(e.target.value, false));
  $("files").addEventListener("change", (e) => {
    addFiles(Array.from(e.target.files));
    e.target.value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      $("files").click();
    }
  });
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles(Array.from(e.dataTransfer.files));
  });
  $("image-threshold").addEventListener("input", onThreshold);
  $("pixel-threshold").addEventListener("input", onThreshold);
  $("reset-thresholds").addEventListener("click", () => {
    const t = state.detector.thresholds;
    state.imageT = t.image;
    state.pixelT = t.pixel;
    state.handSet = false;
    for (const it of ready()) it.outline = null;
    updateAll();
  });
  $("export-csv").addEventListener("click", exportCsv);
  $("export-thresholds").addEventListener("click", exportThresholds);
  $("clear").addEventListener("click", () => {
    clearItems();
    updateAll();
  });
  $("token-box").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("clipfusion-token", state.token);
    loadDetectors();
  });
  $("opacity").addEventListener("input", drawViewer);
  $("outline").addEventListener("change", drawViewer);
  $("viewer-close").addEventListener("click", () => $("viewer").close());
  $("viewer").addEventListener("close", () => (state.viewing = null));
  loadDetectors();
}

init();

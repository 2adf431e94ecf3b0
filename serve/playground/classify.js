// Classification panel: draw on a canvas or drop / pick an image file, see the input as the model sees it
// and the top-k classes as bars, with the server's own latency (its Server-Timing header).
import { errorText, send, showError } from "./api.js";
import { inkBox, paint, pixelsOf, resize, toChannels } from "./imaging.js";

const $ = (id) => document.getElementById(id);
let models = []; // [{name, preprocessing}]

function current() {
  return models.find((m) => m.name === $("classify-model").value);
}

function preprocessingOf(model) {
  const ready = model.versions.filter((v) => v.state === "READY" && v.meta);
  return ready.length ? ready[ready.length - 1].meta.parameters.preprocessing : null;
}

/** What the model sees, from pixels already composited: mode conversion, then the server's resize. */
function modelView(px, pre) {
  return resize(toChannels(px, pre.channels), pre.width, pre.height);
}

function showModelInput(view, pre, how) {
  paint($("model-input"), view);
  $("model-input-caption").textContent =
    `${pre.width}×${pre.height} ${pre.channels === 1 ? "grayscale" : "RGB"}, ${how}; then normalised ` +
    `with mean ${pre.mean.map((m) => m.toFixed(3)).join(", ")} and std ${pre.std.map((s) => s.toFixed(3)).join(", ")}.`;
}

function renderBars(predictions) {
  const list = $("bars");
  list.replaceChildren();
  for (const p of predictions) {
    const li = document.createElement("li");
    li.dataset.label = p.label;
    li.dataset.probability = String(p.probability);
    const pct = `${(p.probability * 100).toFixed(2)}%`;
    li.innerHTML = `<span class="bar-label"></span><span class="bar-track"><span class="bar-fill"></span></span>` +
                   `<span class="bar-value"></span>`;
    li.querySelector(".bar-label").textContent = p.label;
    li.querySelector(".bar-fill").style.width = `${Math.max(p.probability * 100, 0.5)}%`;
    li.querySelector(".bar-value").textContent = pct;
    li.setAttribute("aria-label", `${p.label}: ${pct}`);
    list.append(li);
  }
}

async function classify(body, contentType, source) {
  const model = current();
  showError($("classify-error"), "");
  showError($("classify-topk-error"), "");
  if (!model) return showError($("classify-error"), "No image classifier is ready on this server.");
  const topK = encodeURIComponent($("classify-topk").value);
  const started = performance.now();
  const response = await send(`/predictions/${encodeURIComponent(model.name)}?top_k=${topK}`,
                              { method: "POST", body, headers: { "Content-Type": contentType } });
  const roundTrip = performance.now() - started;
  if (!response.ok) {
    const message = await errorText(response);
    const where = /top_k/.test(message) ? "classify-topk-error" : "classify-error";
    showError($(where), `${source}: ${message}`);
    return;
  }
  renderBars(await response.json());
  const timing = /dur=([\d.]+)/.exec(response.headers.get("Server-Timing") || "");
  $("classify-latency").textContent = (timing ? `server ${Number(timing[1]).toFixed(1)} ms, ` : "") +
                                      `round trip ${roundTrip.toFixed(1)} ms`;
}

// ---- drawing -------------------------------------------------------------------------------------------

function setUpDrawing() {
  const canvas = $("draw-canvas");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height); };
  clear();
  let last = null;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  };
  const line = (from, to) => {
    Object.assign(ctx, { strokeStyle: "#fff", lineWidth: canvas.width / 10, lineCap: "round", lineJoin: "round" });
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
  };
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = at(e);
    ctx.fillStyle = "#fff"; // a tap leaves a dot
    ctx.beginPath();
    ctx.arc(...last, canvas.width / 20, 0, 2 * Math.PI);
    ctx.fill();
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const next = at(e);
    line(last, next);
    last = next;
  });
  for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { last = null; });
  $("draw-clear").addEventListener("click", clear);
}

/** The drawing, centred and scaled to the model's input (digits fill their frame), as PNG bytes. */
async function drawingAsInput(pre) {
  const canvas = $("draw-canvas");
  const box = inkBox(canvas, pre.width <= 8 ? 0.08 : 0.2);
  if (!box) throw new Error("draw something first");
  const side = Math.max(1, Math.round(box.side));
  const crop = document.createElement("canvas");
  Object.assign(crop, { width: side, height: side });
  const ctx = crop.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, side, side);
  ctx.drawImage(canvas, box.x, box.y, box.side, box.side, 0, 0, side, side);
  const view = modelView(pixelsOf(crop, side, side, "#000"), pre);
  showModelInput(view, pre, "white ink on black, cropped to the strokes and resized");
  const out = document.createElement("canvas");
  paint(out, view);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

async function submitDrawing(event) {
  event.preventDefault();
  const model = current();
  const pre = model && preprocessingOf(model);
  if (!pre) return showError($("classify-error"), "No image classifier is ready on this server.");
  try {
    await classify(await drawingAsInput(pre), "image/png", "drawing");
  } catch (e) {
    showError($("classify-error"), `drawing: ${e.message}`);
  }
}

// ---- files ---------------------------------------------------------------------------------------------

async function previewFile(file, pre) {
  try {
    const bitmap = await createImageBitmap(file);
    showModelInput(modelView(pixelsOf(bitmap, bitmap.width, bitmap.height), pre), pre,
                   "transparency over white, resized bilinear");
  } catch (_) {
    paint($("model-input"), { width: 1, height: 1, channels: 1, data: new Float32Array([0]) });
    $("model-input-caption").textContent = "This browser cannot show this file as an image.";
  }
}

async function classifyFile(file) {
  if (!file) return;
  $("classify-file-name").textContent = `${file.name} (${file.size} bytes)`;
  const thumbnail = $("classify-file-preview");
  if (thumbnail.src) URL.revokeObjectURL(thumbnail.src);
  Object.assign(thumbnail, { src: URL.createObjectURL(file), hidden: false });
  thumbnail.onerror = () => { thumbnail.hidden = true; }; // not an image the browser can show
  const pre = current() && preprocessingOf(current());
  if (pre) await previewFile(file, pre);
  await classify(file, file.type || "application/octet-stream", file.name);
}

function setUpFiles() {
  const zone = $("drop-zone");
  $("classify-file").addEventListener("change", (e) => classifyFile(e.target.files[0]));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    classifyFile(e.dataTransfer.files[0]);
  });
}

export function initClassify(allModels) {
  models = allModels.filter((m) => m.task === "image-classification");
  const select = $("classify-model");
  select.replaceChildren(...models.map((m) => new Option(m.name, m.name)));
  const digits = models.find((m) => /digit|mnist/i.test(m.name));
  if (digits) select.value = digits.name;
  setUpDrawing();
  setUpFiles();
  $("classify-form").addEventListener("submit", submitDrawing);
  if (!models.length) showError($("classify-error"), "This server has no image classifier.");
}

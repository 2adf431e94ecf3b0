// Generation panel: stream a completion over /v2/models/{model}/generate_stream in greedy, sampling or beam
// search mode (or all three side by side), with a stop button that closes the stream (the server then
// cancels the request), time to first token, tokens/s and finish reasons.
import { ApiError, showError, streamEvents } from "./api.js";

const $ = (id) => document.getElementById(id);
const Mode = Object.freeze({ GREEDY: "greedy", SAMPLING: "sampling", BEAM: "beam" });
const PROMPTS = { "char-lm": "The ", seq2seq: "What is the tens digit of 52873?" };
const running = new Set(); // AbortControllers of the streams in flight

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function showControlsFor(m) {
  for (const control of document.querySelectorAll("#generate .control")) {
    control.hidden = !control.dataset.modes.split(" ").includes(m);
  }
}

function stopStrings(text) {
  return text.split("\n").filter((s) => s !== "").map((s) => s.replaceAll("\\n", "\n").replaceAll("\\t", "\t"));
}

/** The request's parameters for mode `m`, from the controls that mode uses (empty ones are left out). */
function parameters(m) {
  const params = { logprobs: true }; // each event then carries its tokens, which tokens/s counts
  for (const control of document.querySelectorAll("#generate .control")) {
    if (!control.dataset.modes.split(" ").includes(m)) continue;
    const input = control.querySelector("[data-param]");
    const raw = input.value.trim();
    if (raw === "") continue;
    params[input.dataset.param] = input.dataset.param === "stop" ? stopStrings(input.value) : Number(raw);
  }
  if (m === Mode.GREEDY) params.temperature = 0;
  if (params.stop && !params.stop.length) delete params.stop;
  return params;
}

function clearErrors() {
  for (const el of document.querySelectorAll("#generate-form .error")) showError(el, "");
  for (const el of document.querySelectorAll("#generate-form [aria-invalid]")) el.removeAttribute("aria-invalid");
}

/** Show the server's message next to the control it names (the prompt, a parameter), else under the buttons. */
function showRequestError(message) {
  for (const input of document.querySelectorAll("#generate [data-param]")) {
    if (new RegExp(`\\b${input.dataset.param}\\b`).test(message) && !input.closest(".control").hidden) {
      input.setAttribute("aria-invalid", "true"); // screen readers announce the field as wrong
      return showError(input.closest(".control").querySelector(".error"), message);
    }
  }
  if (/prompt|text_input/.test(message)) {
    $("gen-prompt").setAttribute("aria-invalid", "true");
    return showError($("gen-prompt-error"), message);
  }
  showError($("gen-error"), message);
}

function card(title) {
  const el = document.createElement("article");
  el.className = "output";
  el.innerHTML = `<h3></h3><p class="label muted">streaming…</p><pre class="text"></pre>` +
                 `<ol class="nbest" hidden></ol><p class="stats muted"></p>`;
  el.querySelector("h3").textContent = title;
  return el;
}

function renderFinal(el, m, texts, scores, reasons) {
  const n = texts.length;
  const beamLabel = n > 1 ? `${n}-best hypotheses` : "best hypothesis";
  el.querySelector(".label").textContent = m === Mode.BEAM ? beamLabel : (n > 1 ? `${n} sequences` : "");
  if (n <= 1 && m !== Mode.BEAM) return;
  el.querySelector(".text").hidden = true;
  const list = el.querySelector(".nbest");
  list.hidden = false;
  list.replaceChildren(...texts.map((text, i) => {
    const li = document.createElement("li");
    li.dataset.text = text;
    if (scores[i] !== undefined) li.dataset.score = String(scores[i]);
    li.innerHTML = `<pre></pre><span class="muted small"></span>`;
    li.querySelector("pre").textContent = text;
    li.querySelector("span").textContent = [scores[i] !== undefined ? `score ${scores[i].toFixed(4)}` : "",
                                            `finish: ${reasons[i]}`].filter(Boolean).join(" · ");
    return li;
  }));
}

async function run(m, model, prompt, params, el) {
  const controller = new AbortController();
  running.add(controller);
  $("gen-stop-button").disabled = false;
  const texts = [], scores = [], reasons = [];
  let tokens = 0, firstAt = null;
  const started = performance.now();
  el.dataset.state = "running";
  const onEvent = (e) => {
    texts[e.index] = (texts[e.index] ?? "") + e.text_output;
    if (e.finish_reason) reasons[e.index] = e.finish_reason;
    if (e.score !== undefined) scores[e.index] = e.score;
    if (e.text_output && firstAt === null) firstAt = performance.now();
    if (e.index === 0 || m !== Mode.BEAM) tokens += e.tokens?.length ?? 0;
    if (m !== Mode.BEAM) {
      el.querySelector(".text").textContent = texts[0] ?? "";
    } else if (!e.finish_reason) { // what every live beam agrees on; final events carry each hypothesis' rest
      el.querySelector(".text").textContent = texts[e.index];
      el.querySelector(".label").textContent = "shared prefix of the live beams";
    }
  };
  try {
    await streamEvents(`/v2/models/${encodeURIComponent(model)}/generate_stream`,
                       { text_input: prompt, parameters: params }, onEvent, controller.signal);
    renderFinal(el, m, texts, scores, reasons);
    el.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      el.dataset.state = "stopped";
      el.querySelector(".label").textContent = "stopped";
    } else {
      el.dataset.state = "error";
      el.querySelector(".label").textContent = "failed";
      showRequestError(e instanceof ApiError ? e.message : `connection failed: ${e.message}`);
    }
  } finally {
    running.delete(controller);
    $("gen-stop-button").disabled = running.size === 0;
  }
  const seconds = (performance.now() - started) / 1000;
  el.querySelector(".stats").textContent = [
    reasons.length ? `finish: ${[...new Set(reasons.filter(Boolean))].join(", ")}` : `finish: ${el.dataset.state}`,
    firstAt !== null ? `first token ${(firstAt - started).toFixed(0)} ms` : "",
    `${tokens} tokens, ${(tokens / Math.max(seconds, 1e-3)).toFixed(1)} tokens/s`,
  ].filter(Boolean).join(" · ");
}

function start(modes) {
  clearErrors();
  const model = $("gen-model").value;
  if (!model) return showError($("gen-error"), "This server has no generation model.");
  const outputs = $("gen-outputs");
  outputs.className = modes.length > 1 ? "outputs compare" : "outputs";
  outputs.replaceChildren();
  const names = { greedy: "greedy", sampling: "sampling", beam: "beam search" };
  return Promise.all(modes.map((m) => {
    const el = card(`${names[m]} · ${model}`);
    el.dataset.mode = m;
    outputs.append(el);
    return run(m, model, $("gen-prompt").value, parameters(m), el);
  }));
}

export function initGenerate(allModels) {
  const models = allModels.filter((m) => m.task === "char-lm" || m.task === "seq2seq");
  const select = $("gen-model");
  select.replaceChildren(...models.map((m) => new Option(`${m.name} (${m.task})`, m.name)));
  select.addEventListener("change", () => {
    const task = models.find((m) => m.name === select.value)?.task;
    $("gen-prompt").value = PROMPTS[task] ?? "";
  });
  if (models.length) $("gen-prompt").value = PROMPTS[models[0].task] ?? "";
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => showControlsFor(mode()));
  }
  showControlsFor(mode());
  $("generate-form").addEventListener("submit", (e) => { e.preventDefault(); start([mode()]); });
  $("gen-compare").addEventListener("click", () => start([Mode.GREEDY, Mode.SAMPLING, Mode.BEAM]));
  $("gen-stop-button").addEventListener("click", () => running.forEach((c) => c.abort()));
  if (!models.length) showError($("gen-error"), "This server has no generation model.");
}

// Live metrics panel: scrapes /metrics every 2 s and draws small charts of rates and quantiles computed from
// the difference between two scrapes (what Prometheus' rate() and histogram_quantile() would show).
import { errorText, send, showError } from "./api.js";

const PERIOD_MS = 2000;
const POINTS = 60;
const CHARTS = [
  { id: "requests", title: "requests/s", unit: "" },
  { id: "p50", title: "p50 latency", unit: "ms" },
  { id: "p99", title: "p99 latency", unit: "ms" },
  { id: "batch", title: "batch size", unit: "rows, mean" },
  { id: "queue", title: "queue depth", unit: "" },
  { id: "tokens", title: "tokens/s", unit: "" },
  { id: "running", title: "running rows", unit: "" },
];

/** Prometheus text format -> [{name, labels, value}]. */
export function parse(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

// Model-serving requests only: the page's own scrapes and static files have no model label.
const served = (s) => s.labels.model !== undefined && s.labels.model !== "";

function total(samples, name, keep = () => true) {
  return samples.filter((s) => s.name === name && keep(s)).reduce((a, s) => a + s.value, 0);
}

function buckets(samples, name) {
  const byLe = new Map();
  for (const s of samples.filter((x) => x.name === name && served(x))) {
    byLe.set(s.labels.le, (byLe.get(s.labels.le) ?? 0) + s.value);
  }
  return [...byLe].map(([le, n]) => [Number(le), n]).sort((a, b) => a[0] - b[0]);
}

/** histogram_quantile over the bucket counts added since the last scrape; null when none were. */
function quantile(q, now, before) {
  const delta = now.map(([le, n], i) => [le, n - (before[i]?.[1] ?? 0)]);
  const count = delta.length ? delta[delta.length - 1][1] : 0;
  if (count <= 0) return null;
  const rank = q * count;
  for (let i = 0; i < delta.length; i++) {
    const [le, n] = delta[i];
    if (n >= rank) {
      const [lo, below] = i > 0 ? delta[i - 1] : [0, 0];
      if (!Number.isFinite(le)) return lo;
      return lo + (le - lo) * ((rank - below) / Math.max(n - below, 1e-9));
    }
  }
  return null;
}

function snapshot(samples) {
  return {
    at: performance.now(),
    requests: total(samples, "deepserve_requests_total", served),
    latency: buckets(samples, "deepserve_request_latency_seconds_bucket"),
    batchSum: total(samples, "deepserve_batch_size_sum"),
    batchCount: total(samples, "deepserve_batch_size_count"),
    queue: total(samples, "deepserve_queue_depth") + total(samples, "deepserve_generation_waiting_requests"),
    tokens: total(samples, "deepserve_generation_tokens_total"),
    running: total(samples, "deepserve_generation_running_rows"),
  };
}

function values(now, before) {
  const dt = (now.at - before.at) / 1000;
  const p = (q) => { const v = quantile(q, now.latency, before.latency); return v === null ? null : v * 1000; };
  const batches = now.batchCount - before.batchCount;
  return {
    requests: (now.requests - before.requests) / dt,
    p50: p(0.5),
    p99: p(0.99),
    batch: batches > 0 ? (now.batchSum - before.batchSum) / batches : null,
    queue: now.queue,
    tokens: (now.tokens - before.tokens) / dt,
    running: now.running,
  };
}

function format(v) {
  if (v === null) return "–";
  return Math.abs(v) >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1);
}

function sparkline(points) {
  const w = 200, h = 40;
  const ys = points.map((v) => v ?? 0);
  const max = Math.max(...ys, 1e-9);
  const coords = ys.map((v, i) => `${(i * w) / Math.max(ys.length - 1, 1)},${h - 2 - (v / max) * (h - 4)}`);
  return `<svg viewBox="0 0 ${w} ${h}" preserveAspectRatio="none" aria-hidden="true">` +
         `<polyline points="${coords.join(" ")}" /></svg>`;
}

function build() {
  const root = document.getElementById("charts");
  root.replaceChildren(...CHARTS.map((c) => {
    const el = document.createElement("figure");
    el.className = "chart";
    el.innerHTML = `<figcaption>${c.title}</figcaption>` +
                   `<p><output id="metric-${c.id}">–</output> <span class="muted">${c.unit}</span></p>` +
                   `<div class="spark"></div>`;
    return el;
  }));
}

export function initMetrics() {
  build();
  const history = Object.fromEntries(CHARTS.map((c) => [c.id, []]));
  const error = document.getElementById("metrics-error");
  let before = null;
  let scrapes = 0;
  const scrape = async () => {
    try {
      const response = await send("/metrics");
      if (!response.ok) throw new Error(await errorText(response));
      const now = snapshot(parse(await response.text()));
      if (before) {
        const v = values(now, before);
        for (const c of CHARTS) {
          const points = history[c.id];
          points.push(v[c.id]);
          if (points.length > POINTS) points.shift();
          document.getElementById(`metric-${c.id}`).textContent = format(v[c.id]);
          document.getElementById(`metric-${c.id}`).closest(".chart").querySelector(".spark").innerHTML = sparkline(points);
        }
      }
      before = now;
      document.getElementById("charts").dataset.scrapes = String(++scrapes);
      showError(error, "");
    } catch (e) {
      showError(error, `Could not read /metrics: ${e.message}`);
    }
  };
  scrape();
  setInterval(scrape, PERIOD_MS);
}

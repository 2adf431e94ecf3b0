// Models panel: the model index (every model and version, with state and reason), each ready version's
// metadata (task, backend) and config (precision), and copyable "how to call it" snippets.
import { json, showError } from "./api.js";

const BASE = window.location.origin;

async function versionDetails(name, version) {
  const path = `/v2/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}`;
  const [meta, config] = await Promise.all([json(path), json(`${path}/config`)]);
  return { meta, config };
}

function state(v) {
  if (v.ready) return "READY";
  return v.reason === "loading" ? "LOADING" : "UNAVAILABLE";
}

/** Every model: {name, task, ready, versions: [{version, state, reason, meta, config}]}, from GET /v2/models
 * (the index an API key may read; Triton's POST /v2/repository/index is for admins) and each ready version's
 * metadata and config. */
export async function loadModels() {
  const index = await json("/v2/models");
  return Promise.all(index.models.map(async (m) => {
    const versions = m.version_status.length ? m.version_status : [{ version: "", ready: false, reason: m.reason }];
    return {
      name: m.name, task: m.task, ready: m.ready,
      versions: await Promise.all(versions.map(async (v) => ({
        version: v.version, state: state(v), reason: v.reason,
        ...(v.ready ? await versionDetails(m.name, v.version) : {}),
      }))),
    };
  }));
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (className) td.className = className;
  return td;
}

function renderTable(models) {
  const body = document.querySelector("#models-table tbody");
  body.replaceChildren();
  for (const m of models) {
    for (const v of m.versions) {
      const tr = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = m.name;
      tr.append(th, cell(v.version || "—"), cell(m.task || "—"), cell(v.meta?.platform || "—"),
                cell(v.config?.parameters?.precision || "—"),
                cell(v.state, `state state-${v.state.toLowerCase()}`), cell(v.reason || ""));
      body.append(tr);
    }
  }
}

/** {label: code} for a model: curl, the project's SDK, and openai / tritonclient where they apply. */
export function snippets(m) {
  const name = m.name;
  if (m.task === "image-classification") {
    return {
      curl: `curl -s -T digit.png '${BASE}/predictions/${name}?top_k=3'`,
      "Python SDK": `from deepserve.clients import Client\n\nwith Client("${BASE}") as client:\n` +
                    `    print(client.classify("digit.png", "${name}", top_k=3))`,
      tritonclient: `import numpy as np\nimport tritonclient.http as httpclient\n\n` +
                    `client = httpclient.InferenceServerClient("${BASE.replace(/^https?:\/\//, "")}")\n` +
                    `image = np.array([open("digit.png", "rb").read()], dtype=np.object_)\n` +
                    `inputs = [httpclient.InferInput("images", [1], "BYTES")]\n` +
                    `inputs[0].set_data_from_numpy(image)\n` +
                    `outputs = [httpclient.InferRequestedOutput("logits", class_count=3)]\n` +
                    `print(client.infer("${name}", inputs, outputs=outputs).as_numpy("logits"))`,
    };
  }
  const prompt = m.task === "seq2seq" ? "What is the tens digit of 52873?" : "The ";
  return {
    curl: `curl -sN ${BASE}/v2/models/${name}/generate_stream \\\n` +
          `  -d '{"text_input": ${JSON.stringify(prompt)}, "parameters": {"temperature": 0.8, "seed": 1}}'`,
    "Python SDK": `from deepserve.clients import Client\n\nwith Client("${BASE}") as client:\n` +
                  `    for event in client.stream("${name}", ${JSON.stringify(prompt)}, temperature=0.8, seed=1):\n` +
                  `        print(event.text, end="", flush=True)`,
    openai: `from openai import OpenAI\n\nclient = OpenAI(base_url="${BASE}/v1", api_key="unused")\n` +
            `for chunk in client.completions.create(model="${name}", prompt=${JSON.stringify(prompt)},\n` +
            `                                       max_tokens=64, temperature=0.8, seed=1, stream=True):\n` +
            `    print(chunk.choices[0].text, end="", flush=True)`,
  };
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch (_) {
    button.textContent = "Select and copy"; // clipboard refused (plain http on another host): select instead
    const code = button.closest(".snippet").querySelector("code");
    window.getSelection().selectAllChildren(code);
  }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function renderSnippets(models) {
  const root = document.getElementById("snippets");
  root.replaceChildren();
  for (const m of models.filter((x) => x.task)) {
    const box = document.createElement("details");
    box.className = "snippets";
    box.innerHTML = `<summary>How to call <strong></strong></summary><div class="tabs" role="tablist"></div>`;
    box.querySelector("strong").textContent = m.name;
    const tabs = box.querySelector(".tabs");
    const panes = [];
    Object.entries(snippets(m)).forEach(([label, code], i) => {
      const id = `snippet-${m.name}-${i}`.replace(/[^\w-]/g, "_");
      const tab = document.createElement("button");
      Object.assign(tab, { type: "button", textContent: label, id: `${id}-tab` });
      tab.setAttribute("role", "tab");
      tab.setAttribute("aria-controls", id);
      const pane = document.createElement("div");
      Object.assign(pane, { id, className: "snippet", hidden: i > 0 });
      pane.setAttribute("role", "tabpanel");
      pane.setAttribute("aria-labelledby", tab.id);
      pane.innerHTML = `<pre><code></code></pre><button type="button" class="copy">Copy</button>`;
      pane.querySelector("code").textContent = code;
      pane.querySelector(".copy").addEventListener("click", (e) => copy(code, e.currentTarget));
      tab.addEventListener("click", () => {
        panes.forEach(([t, p]) => { p.hidden = p !== pane; t.setAttribute("aria-selected", String(p === pane)); });
      });
      tab.setAttribute("aria-selected", String(i === 0));
      panes.push([tab, pane]);
      tabs.append(tab);
    });
    panes.forEach(([, pane]) => box.append(pane));
    root.append(box);
  }
  root.querySelector("details")?.setAttribute("open", "");
}

export async function initModels() {
  const error = document.getElementById("models-error");
  try {
    const models = await loadModels();
    renderTable(models);
    renderSnippets(models);
    showError(error, "");
    return models;
  } catch (e) {
    showError(error, `Could not list the models: ${e.message}`);
    return [];
  }
}

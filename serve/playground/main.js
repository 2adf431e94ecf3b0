// The playground: one page, four panels, all through the server's public HTTP API.
import { json } from "./api.js";
import { initClassify } from "./classify.js";
import { initGenerate } from "./generate.js";
import { initMetrics } from "./metrics.js";
import { initModels } from "./models.js";

async function serverStatus() {
  const status = document.getElementById("server-status");
  try {
    const server = await json("/v2");
    status.textContent = `${server.name} ${server.version} at ${window.location.host}`;
  } catch (e) {
    status.textContent = `server unreachable: ${e.message}`;
  }
}

async function main() {
  serverStatus();
  initMetrics();
  const models = await initModels();
  initClassify(models);
  initGenerate(models);
  document.body.dataset.ready = "true"; // the panels are filled in
}

main();

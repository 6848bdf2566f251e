// The page's glue: open the export with onnxruntime-web, route each prompt and stream the answer.
// The export is fetched over HTTP from `?export=URL` (default: ../../ifp-artifacts/, i.e. serve the repository root
// after `ifp-export export`).
import * as ort from "onnxruntime-web";
import { IfpClient, httpFiles } from "../js/ifp-client.js";

const $ = (id) => document.getElementById(id);
const exportUrl = new URLSearchParams(location.search).get("export") ?? "../../ifp-artifacts/";

ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? 0 : 1; // threads need a cross-origin-isolated page

function showRoute(route) {
  $("variant").textContent = route.variant;
  const low = Math.min(...Object.values(route.scores));
  const rows = Object.entries(route.scores).map(([name, score]) => {
    const row = document.createElement("tr");
    row.className = name === route.variant ? "best" : "";
    const width = 1 + 60 * (score - low);
    row.innerHTML = `<td>${name}</td><td>${score >= 0 ? "+" : ""}${score.toFixed(3)}</td><td><span class="bar" style="width:${width}px"></span></td>`;
    return row;
  });
  $("scores").tBodies[0].replaceChildren(...rows);
}

async function ask(client, prompt) {
  document.body.dataset.state = "running";
  delete document.body.dataset.tokens;
  $("answer").textContent = "";
  const route = await client.route(prompt);
  showRoute(route);
  const tokens = [];
  async function* recorded() {
    for await (const token of client.generate(prompt, { variant: route.variant })) {
      tokens.push(token);
      yield token;
    }
  }
  for await (const piece of client.streamText(recorded())) $("answer").textContent += piece;
  document.body.dataset.tokens = JSON.stringify(tokens);
  document.body.dataset.state = "done";
}

async function main() {
  const client = await IfpClient.open({ ort, files: httpFiles(exportUrl), sessionOptions: { executionProviders: ["wasm"] } });
  $("status").textContent = `export ${new URL(exportUrl, location.href).pathname} · ${client.manifest.variants.length} variants · onnxruntime-web ${ort.env.versions.web}`;
  const button = $("ask").querySelector("button");
  button.disabled = false;
  document.body.dataset.state = "ready";
  $("ask").addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    try {
      await ask(client, $("prompt").value);
    } catch (error) {
      fail(error);
    } finally {
      button.disabled = false;
    }
  });
}

function fail(error) {
  $("status").textContent = `error: ${error.message ?? error}`;
  document.body.dataset.state = "error";
}

main().catch(fail);

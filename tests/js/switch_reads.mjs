// Count the export's file reads while the client switches variants on onnxruntime-web (bytes + externalData):
// print {"reads": {path: count}, "variants": [...]} after answering each prompt in turn.
//
//   node switch_reads.mjs OUT RUNTIME_DIR PROMPTS_JSON MAX_SESSIONS
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { resolve } from "node:path";
import { IfpClient } from "./ifp-client.js";

const [root, runtime, promptsJson, maxSessions] = process.argv.slice(2);
const ort = createRequire(import.meta.url)(resolve(runtime));
ort.env.wasm.numThreads = 1;
const reads = {};
const files = {
  async bytes(path) {
    reads[path] = (reads[path] ?? 0) + 1;
    return new Uint8Array(await readFile(resolve(root, path)));
  },
};
const client = await IfpClient.open({ ort, files, maxSessions: Number(maxSessions) });
const variants = [];
for (const prompt of JSON.parse(promptsJson)) {
  const { variant } = await client.route(prompt);
  for await (const _token of client.generate(prompt, { variant, maxNewTokens: 2 }));
  variants.push(variant);
}
await client.close();
console.log(JSON.stringify({ reads, variants }));

#!/usr/bin/env node
// Ask an export questions from Node, like `ifp-export run`: the route on stderr, the answer streamed on stdout.
//
//   node cli.js OUT --prompt "add 45+12=" [--prompt ...] [--runtime onnxruntime-node|onnxruntime-web|DIR]
//                   [--variant NAME] [--max-new-tokens N] [--json]
//
// --runtime names the ONNX Runtime package (or the directory of an installed one); onnxruntime-web runs its
// WebAssembly build in Node. --json prints one JSON object per prompt instead (route, token ids, text).

import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { resolve } from "node:path";
import { parseArgs } from "node:util";
import { IfpClient } from "./ifp-client.js";

/** The export's files from disk; `localPath` lets onnxruntime-node open the models itself. */
export function diskFiles(root, { byPath }) {
  const files = { bytes: async (path) => new Uint8Array(await readFile(resolve(root, path))) };
  if (byPath) files.localPath = (path) => resolve(root, path);
  return files;
}

/** Pass tokens through, keeping a copy. */
async function* recorded(tokens, into) {
  for await (const token of tokens) {
    into.push(token);
    yield token;
  }
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      prompt: { type: "string", multiple: true },
      runtime: { type: "string", default: "onnxruntime-node" },
      variant: { type: "string" },
      "max-new-tokens": { type: "string", default: "64" },
      json: { type: "boolean", default: false },
    },
  });
  if (positionals.length !== 1 || !values.prompt) {
    throw new Error("usage: node cli.js OUT --prompt TEXT [--prompt TEXT ...] [--runtime PKG|DIR] [--json]");
  }
  const ort = createRequire(import.meta.url)(values.runtime);
  const web = "web" in ort.env.versions;
  if (web) ort.env.wasm.numThreads = 1; // no worker threads in Node
  const client = await IfpClient.open({
    ort,
    files: diskFiles(positionals[0], { byPath: !web }),
    sessionOptions: web ? {} : { intraOpNumThreads: 1 },
  });
  const maxNewTokens = Number(values["max-new-tokens"]);
  for (const prompt of values.prompt) {
    const route = values.variant ? null : await client.route(prompt);
    const variant = values.variant ?? route.variant;
    const tokens = [];
    const pieces = client.streamText(recorded(client.generate(prompt, { variant, maxNewTokens }), tokens));
    if (!values.json) {
      const scores = Object.entries(route?.scores ?? {}).map(([name, s]) => `${name} ${s >= 0 ? "+" : ""}${s.toFixed(3)}`);
      console.error(route ? `routed to ${variant} (variant_scores: ${scores.join(", ")})` : `variant ${variant}`);
    }
    let text = "";
    for await (const piece of pieces) {
      text += piece;
      if (!values.json) process.stdout.write(piece);
    }
    const record = { prompt, ids: client.encode(prompt), route, variant, tokens, text, versions: ort.env.versions };
    process.stdout.write(values.json ? `${JSON.stringify(record)}\n` : "\n");
  }
  await client.close();
}

main().catch((error) => {
  console.error(`error: ${error.message ?? error}`);
  process.exit(2);
});

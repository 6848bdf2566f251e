// ifp-export's JavaScript client, an ES module an app can copy: it reads an export's manifest.json, routes a prompt
// with predictor.onnx and greedy-decodes the routed variant with its KV cache, streaming text.
//
// The ONNX Runtime object is injected, never imported, so the same module runs on every package of the
// onnxruntime-common API: onnxruntime-node and onnxruntime-react-native (files from disk) and onnxruntime-web
// (WebAssembly, in a browser or in Node). It needs `BigInt64Array` and `TextDecoder` (React Native's Hermes: add a
// TextDecoder polyfill if your version lacks one). The export's files are reached through a small `files` object:
//
//   files.bytes(path)      -> Promise<Uint8Array>  the file at `path` (relative to the export's root), for every runtime
//   files.localPath(path)  -> string                optional: a path ONNX Runtime can open itself (Node, React Native)
//
// With `localPath`, sessions are created from the model's path and ONNX Runtime reads the external data files beside
// it (onnxruntime-node before 1.24 has no `externalData` option). Without it (onnxruntime-web), each model's bytes are
// passed with its external data through the session option `externalData`.
//
// Every file the client reads itself (the tokenizer; without `localPath`, the models and their data) must be listed in the
// manifest with its size and, where `crypto.subtle` exists (Node, browsers on https or localhost), its sha256: a
// truncated download or a damaged file is refused, never run.
//
// Shared weights: the onnxruntime-common API cannot hand one weight buffer to several sessions (the Python runtime
// does it with `SessionOptions.add_initializer`, and runs all variants on one session by turning their FFN
// initializers into inputs, an in-memory graph edit this module does not make), so every session holds its own copy
// of the shared weights in ONNX Runtime's memory. What the API allows is done: a data file several models use (the
// shared weights) is read or fetched once and its buffer passed to every session that uses it (`externalData`), and a
// variant's session is kept after a switch (up to `maxSessions`, least recently used released first), so switching
// back costs nothing.

import { Tokenizer } from "@huggingface/tokenizers";

// A path inside the export (the manifest schema's `relpath`): not absolute, no `..`, no `\` or `:` (no URL scheme).
const RELATIVE_PATH = /^(?!\/)(?!.*(^|\/)\.\.(\/|$))[^\\:]+$/;

/** The export's files over HTTP(S), relative to `baseUrl` (a browser, or any runtime with `fetch`). */
export function httpFiles(baseUrl, fetchImpl = globalThis.fetch) {
  const base = new URL(baseUrl, globalThis.location?.href);
  return {
    async bytes(path) {
      const response = await fetchImpl(new URL(path, base));
      if (!response.ok) throw new Error(`${path}: HTTP ${response.status} from ${new URL(path, base)}`);
      return new Uint8Array(await response.arrayBuffer());
    },
  };
}

export class IfpClient {
  /**
   * Open an export: read manifest.json and the tokenizer, create the predictor's session.
   * @param {{ort: object, files: object, sessionOptions?: object, maxSessions?: number}} options
   *   `ort`: the ONNX Runtime module (e.g. `import * as ort from "onnxruntime-web"`); `sessionOptions`: passed to
   *   every session (execution providers, threads).
   */
  static async open({ ort, files, sessionOptions = {}, maxSessions = 2 }) {
    const client = new IfpClient(ort, files, sessionOptions, maxSessions);
    client.manifest = JSON.parse(new TextDecoder().decode(await files.bytes("manifest.json")));
    client.listed = new Map(client.manifest.files.map((file) => [file.path, file]));
    const decoders = [client.manifest.dense, ...client.manifest.variants].map((entry) => entry.files.onnx.data).flat();
    client.shared = new Set(decoders.filter((path, i) => decoders.indexOf(path) !== i)); // data of several models
    const tokenizerJson = JSON.parse(new TextDecoder().decode(await client.read(client.manifest.tokenizer.file)));
    client.tokenizer = new Tokenizer(tokenizerJson, {});
    const eos = client.manifest.tokenizer.eos_token_id;
    client.eosIds = new Set(eos == null ? [] : [eos].flat());
    client.predictor = await client.createSession(client.manifest.predictor.onnx);
    return client;
  }

  constructor(ort, files, sessionOptions, maxSessions) {
    this.ort = ort;
    this.files = files;
    this.sessionOptions = sessionOptions;
    this.maxSessions = maxSessions;
    this.buffers = new Map(); // path -> Uint8Array of a data file several models use, read once and kept
    this.sessions = new Map(); // variant name -> session, in least-recently-used order
  }

  /** The manifest's entry of a file inside the export (anything else is refused). */
  listedFile(path) {
    const listed = this.listed.get(path);
    if (!listed || !RELATIVE_PATH.test(path)) {
      throw new Error(`${path} is not a file listed inside the export's manifest.json: re-export, or copy it whole`);
    }
    return listed;
  }

  /** A file's bytes, checked against its manifest entry (size; sha256 where `crypto.subtle` exists). */
  async read(path) {
    const listed = this.listedFile(path);
    const bytes = await this.files.bytes(path);
    const subtle = globalThis.crypto?.subtle;
    const digest = subtle ? hex(await subtle.digest("SHA-256", bytes)) : listed.sha256;
    if (bytes.length !== listed.size || digest !== listed.sha256) {
      const got = `${bytes.length} bytes, sha256 ${digest.slice(0, 12)}…`;
      const want = `${listed.size} bytes, ${listed.sha256.slice(0, 12)}…`;
      throw new Error(`${path} does not match manifest.json (${got}; listed: ${want}): copy the export again`);
    }
    return bytes;
  }

  /** A data file's bytes: kept when several models use it (the shared weights), else read for this session only. */
  async dataFile(path) {
    if (!this.shared.has(path)) return this.read(path);
    if (!this.buffers.has(path)) this.buffers.set(path, await this.read(path));
    return this.buffers.get(path);
  }

  /** A session of a manifest model entry ({model, data}): from its path, or from bytes with its external data. */
  async createSession(entry) {
    this.checkFloor(entry);
    if (this.files.localPath) {
      [entry.model, ...entry.data].forEach((path) => this.listedFile(path));
      return this.ort.InferenceSession.create(this.files.localPath(entry.model), this.sessionOptions);
    }
    const folder = entry.model.slice(0, entry.model.lastIndexOf("/") + 1);
    // `path` is the location the graph names, relative to the graph's own folder.
    const externalData = await Promise.all(
      entry.data.map(async (path) => ({ path: path.slice(folder.length), data: await this.dataFile(path) })),
    );
    const model = await this.read(entry.model);
    return this.ort.InferenceSession.create(model, { ...this.sessionOptions, externalData });
  }

  /** Refuse a graph whose recorded floor (`min_onnxruntime`) is newer than the injected runtime: ONNX Runtime's own
   * error for an opset it does not know is cryptic (onnxruntime-web 1.20 throws a bare number). */
  checkFloor(entry) {
    const have = this.ort.env?.versions?.common;
    if (entry.min_onnxruntime && have && compareReleases(have, entry.min_onnxruntime) < 0) {
      throw new Error(
        `${entry.model} needs onnxruntime ${entry.min_onnxruntime} or newer, this app has ${have}: ` +
          "update the package, or re-export with an older --min-onnxruntime",
      );
    }
  }

  /** The prompt's token ids (special tokens as the export's tokenizer adds them, like `tokenizers` in Python). */
  encode(prompt) {
    const ids = prompt ? this.tokenizer.encode(prompt).ids : [];
    if (ids.length === 0) throw new Error(`the prompt ${JSON.stringify(prompt)} encodes to no tokens`);
    return ids;
  }

  /**
   * Run predictor.onnx once and pick the variant at argmax(variant_scores) (order: the manifest's variant_order).
   * The predictor reads the prompt's first `predictor.max_length` tokens (`predictor.truncation: "keep_first"`).
   */
  async route(prompt) {
    const { max_length: maxLength, routing } = this.manifest.predictor;
    const all = this.encode(prompt);
    const ids = all.slice(0, maxLength);
    const outputs = await this.predictor.run({
      input_ids: this.int64([1, ids.length], ids),
      attention_mask: this.int64([1, ids.length], ids.map(() => 1)),
    });
    const variantScores = Array.from(outputs.variant_scores.data);
    const best = argmax(variantScores);
    const scores = Object.fromEntries(routing.variant_order.map((name, i) => [name, variantScores[i]]));
    return { variant: routing.variant_order[best], scores, truncated: all.length > maxLength };
  }

  /** The decoder session of a variant (or "dense"), kept for the next switch back. */
  async decoder(name) {
    if (this.sessions.has(name)) {
      const session = this.sessions.get(name);
      this.sessions.delete(name); // re-insert: most recently used last
      this.sessions.set(name, session);
      return session;
    }
    const entry = name === "dense" ? this.manifest.dense : this.manifest.variants.find((v) => v.name === name);
    if (!entry) throw new Error(`no variant ${JSON.stringify(name)} in manifest.json`);
    while (this.sessions.size >= this.maxSessions) {
      const [oldest, session] = this.sessions.entries().next().value;
      this.sessions.delete(oldest);
      await session.release?.();
    }
    const session = await this.createSession(entry.files.onnx);
    this.sessions.set(name, session);
    return session;
  }

  /**
   * Yield new token ids one at a time: greedy, with the KV cache in Optimum's layout, stopping after an EOS id of
   * the manifest (which is yielded) or after `maxNewTokens`. The model is `variant`, else the routed one.
   */
  async *generate(prompt, { variant = null, maxNewTokens = 64 } = {}) {
    const ids = this.encode(prompt);
    const session = await this.decoder(variant ?? (await this.route(prompt)).variant);
    const { num_key_value_heads: kvHeads, head_dim: headDim } = this.manifest.model;
    const pastNames = session.inputNames.filter((name) => name.startsWith("past_key_values."));
    let past = Object.fromEntries(
      pastNames.map((name) => [name, new this.ort.Tensor("float32", new Float32Array(0), [1, kvHeads, 0, headDim])]),
    );
    let inputIds = ids;
    let length = 0; // tokens already in the cache
    for (let step = 0; step < maxNewTokens; step++) {
      const total = length + inputIds.length;
      const outputs = await session.run({
        input_ids: this.int64([1, inputIds.length], inputIds),
        attention_mask: this.int64([1, total], new Array(total).fill(1)),
        position_ids: this.int64([1, inputIds.length], inputIds.map((_, i) => length + i)),
        ...past,
      });
      const vocab = outputs.logits.dims[2];
      const token = argmax(outputs.logits.data.subarray((inputIds.length - 1) * vocab, inputIds.length * vocab));
      yield token;
      if (this.eosIds.has(token)) return;
      past = Object.fromEntries(pastNames.map((name) => [name, outputs[name.replace("past_key_values.", "present.")]]));
      length = total;
      inputIds = [token];
    }
  }

  /** Text pieces as tokens arrive, EOS excluded (decoding the whole prefix keeps multi-token characters right). */
  async *streamText(tokens) {
    const ids = [];
    let shown = "";
    for await (const token of tokens) {
      if (this.eosIds.has(token)) return;
      ids.push(token);
      const text = this.tokenizer.decode(ids, { skip_special_tokens: true });
      yield text.slice(shown.length);
      shown = text;
    }
  }

  int64(dims, values) {
    return new this.ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);
  }

  /** Release every session (the app is done with the export). */
  async close() {
    for (const session of [this.predictor, ...this.sessions.values()]) await session.release?.();
    this.sessions.clear();
    this.buffers.clear();
  }
}

/** Negative, zero or positive as release `a` is older than, the same as or newer than `b` ("1.20" = "1.20.0"). */
function compareReleases(a, b) {
  const [x, y] = [a, b].map((release) => [0, 1, 2].map((i) => parseInt(release.split(/[.-]/)[i], 10) || 0));
  return x.map((part, i) => part - (y[i] ?? 0)).find((difference) => difference !== 0) ?? 0;
}

function hex(digest) {
  return Array.from(new Uint8Array(digest), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** Index of the largest value, ties to the first (as numpy's argmax). */
function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

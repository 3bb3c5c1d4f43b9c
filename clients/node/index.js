// A small promise-based Node.js client for saescope, built at runtime from protos/ (no codegen).
//
//   const { SaeScopeClient, clamp } = require('./index');
//   const client = new SaeScopeClient({ target: 'localhost:9000' });
//   const info = await client.info();
//   const acts = await client.activations(['The cat sat'], { topK: 3 });
//   const gen = await client.generate('I think', { interventions: [clamp(12, 8)] });
//   const why = await client.attribute('The Eiffel Tower is in', { target: ' Paris' });
//   const found = await client.searchFeatures('ocean', { topN: 5 });
//   for await (const ev of client.stream('Once upon a time', { maxNewTokens: 20 })) { ... }
//   client.close();
//
// Fields are camelCase (proto-loader's default), enums in responses are their names
// ('FINISH_REASON_EOS'), int64 values are Numbers. Inputs take the API's words, read from the
// .proto's enums: `interventions` has a constructor per intervention mode (`clamp`, `add`, ...),
// scopes are SCOPES ('all', 'prompt', 'generated'), aggregations AGGREGATIONS ('max', ...);
// a word not in the .proto throws a RangeError naming the field. Failed calls reject with a
// SaeScopeError carrying the gRPC status name (e.g. 'NOT_FOUND') and the server's message.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'saescope/api/v1/saescope.proto';
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

// Loaded once, at require time: the service stub and the vocabularies below both come from it.
const DEFINITION = protoLoader.loadSync(PROTO_FILE, {
  includeDirs: [PROTO_ROOT],
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});

function loadService() {
  return grpc.loadPackageDefinition(DEFINITION).saescope.api.v1.SaeScope;
}

// ---- vocabularies: the .proto's enums, as words (one word, one place) ---------------------
// An enum's words are its value names less the enum's prefix, lowercased, in the .proto's
// order (Intervention.MODE_CLAMP -> 'clamp'); X_UNSPECIFIED is not a word. The same rule as
// protos/saescope/api/v1/vocabulary.py, so a value added to the .proto is a word here too.

/** The EnumDescriptorProto of `saescope.api.v1.<message>.<name>` (or of `<name>` alone). */
function enumDescriptor(message, name) {
  const found = message
    ? DEFINITION[`saescope.api.v1.${message}`].type.enumType.find((e) => e.name === name)
    : DEFINITION[`saescope.api.v1.${name}`]?.type;
  if (!found) throw new Error(`${PROTO_FILE}: no enum ${message ? `${message}.` : ''}${name}`);
  return found;
}

/** word -> enum value name (what proto-loader sends with `enums: String`), in .proto order. */
function vocabulary(descriptor) {
  const prefix = `${descriptor.name.replace(/(?<!^)(?=[A-Z])/g, '_').toUpperCase()}_`;
  const names = {};
  for (const { name } of descriptor.value) {
    if (name === `${prefix}UNSPECIFIED`) continue;
    names[(name.startsWith(prefix) ? name.slice(prefix.length) : name).toLowerCase()] = name;
  }
  return Object.freeze(names);
}

const MODE = vocabulary(enumDescriptor('Intervention', 'Mode'));
const SCOPE = vocabulary(enumDescriptor('Intervention', 'Scope'));
const AGGREGATION = vocabulary(enumDescriptor(null, 'Aggregation'));
const MODES = Object.freeze(Object.keys(MODE));
const SCOPES = Object.freeze(Object.keys(SCOPE));
const AGGREGATIONS = Object.freeze(Object.keys(AGGREGATION));
const ORDER_BY = vocabulary(enumDescriptor('SearchFeaturesByContrastRequest', 'OrderBy'));
const ORDERS = Object.freeze(Object.keys(ORDER_BY));

/** The enum value name of `word`, or an error naming `field` and the words it accepts. */
function enumName(names, word, field) {
  if (typeof word === 'string' && Object.prototype.hasOwnProperty.call(names, word)) {
    return names[word];
  }
  const words = Object.keys(names).join(', ');
  throw new RangeError(`${field}: ${JSON.stringify(word)} is not one of ${words}`);
}

/** A failed call: `code` is the gRPC status name, `details` the server's message. */
class SaeScopeError extends Error {
  constructor(code, details) {
    super(`${code}: ${details}`);
    this.name = 'SaeScopeError';
    this.code = code;
    this.details = details;
  }

  static from(err) {
    return new SaeScopeError(STATUS_NAMES[err.code] || 'UNKNOWN', err.details || err.message);
  }
}

/** A prompt: a string, or a chat as [{role, content}, ...]. */
function toPrompt(prompt, addGenerationPrompt = false) {
  if (typeof prompt === 'string') return { text: prompt };
  if (Array.isArray(prompt)) return { chat: { messages: prompt, addGenerationPrompt } };
  throw new TypeError('prompt: expected a string or an array of {role, content} messages');
}

// Intervention constructors, one per mode of the .proto: `interventions.clamp(feature, value,
// scope = 'all')`; a mode whose value the service ignores takes none: `ablate(feature, scope)`;
// a vector mode takes a vector instead of a feature: `direction(vector, value = 1, scope)`
// (d_in numbers, e.g. a contrast's `differenceInMeans`).
const VALUELESS_MODES = new Set(['ablate']);
const VECTOR_MODES = new Set(['direction']);

function intervention(mode, feature, value, scope) {
  return { feature, mode: MODE[mode], value, scope: enumName(SCOPE, scope, 'scope') };
}

/** A DenseTensor of numbers: packed little-endian float32 plus the shape. */
function arrayToDense(values) {
  const list = Array.from(values, Number);
  const data = Buffer.alloc(4 * list.length);
  list.forEach((x, i) => data.writeFloatLE(x, i * 4));
  return { shape: [list.length], data };
}

function constructor(mode) {
  if (VECTOR_MODES.has(mode)) {
    return (vector, value = 1, scope = 'all') => ({
      ...intervention(mode, 0, value, scope),
      direction: arrayToDense(vector),
    });
  }
  if (VALUELESS_MODES.has(mode)) {
    return (feature, scope = 'all') => intervention(mode, feature, 0, scope);
  }
  return (feature, value = 0, scope = 'all') => intervention(mode, feature, value, scope);
}

const interventions = Object.freeze(
  Object.fromEntries(MODES.map((mode) => [mode, constructor(mode)])),
);
const { clamp, add, multiply, ablate, direction } = interventions;

/**
 * The intervention, applied only where a condition holds (read before any edit):
 * `when(clamp(5, 0), { feature: 77, above: 2 })` — feature 77's value above 2 — or
 * `when(add(5, 3), { direction: vector, above: 1.5 })` — the residual's projection on the
 * vector's unit direction above 1.5. A completion's `fired` (and each streamed token's) says
 * where it applied.
 */
function when(edit, { feature, direction: vector, above = 0 } = {}) {
  if ((feature === undefined) === (vector === undefined)) {
    throw new TypeError('when: give exactly one of feature and direction');
  }
  const condition = { threshold: above };
  if (feature !== undefined) condition.feature = feature;
  else condition.direction = arrayToDense(vector);
  return { ...edit, condition };
}

/** A DenseTensor's values (little-endian float32) as a Float32Array. */
function denseToArray(tensor) {
  const data = tensor && tensor.data ? tensor.data : Buffer.alloc(0);
  const out = new Float32Array(data.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = data.readFloatLE(i * 4);
  return out;
}

class SaeScopeClient {
  /**
   * @param {object} [options]
   * @param {string} [options.target] host:port (default SAESCOPE_TARGET or localhost:9000)
   * @param {string} [options.apiKey] sent as x-api-key (default SAESCOPE_API_KEY)
   * @param {string} [options.application] Ray Serve application (default 'saescope')
   * @param {number} [options.timeoutMs] default deadline per call (default 300 s)
   * @param {boolean} [options.secure] TLS with the system roots
   * @param {Buffer} [options.rootCerts] PEM roots (implies TLS)
   */
  constructor(options = {}) {
    const target = options.target || process.env.SAESCOPE_TARGET || 'localhost:9000';
    const secure = options.secure || Boolean(options.rootCerts);
    const credentials = secure
      ? grpc.credentials.createSsl(options.rootCerts || null)
      : grpc.credentials.createInsecure();
    const Service = loadService();
    this.stub = new Service(target, credentials, {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    });
    this.timeoutMs = options.timeoutMs || 300000;
    this.metadata = new grpc.Metadata();
    const application = options.application === undefined ? 'saescope' : options.application;
    if (application) this.metadata.set('application', application);
    const apiKey = options.apiKey || process.env.SAESCOPE_API_KEY;
    if (apiKey) this.metadata.set('x-api-key', apiKey);
  }

  _options(timeoutMs) {
    return { deadline: new Date(Date.now() + (timeoutMs || this.timeoutMs)) };
  }

  _unary(method, request, timeoutMs) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, this.metadata, this._options(timeoutMs), (err, response) =>
        err ? reject(SaeScopeError.from(err)) : resolve(response),
      );
    });
  }

  info({ timeoutMs } = {}) {
    return this._unary('GetInfo', {}, timeoutMs);
  }

  tokenize(prompt, { timeoutMs } = {}) {
    return this._unary('Tokenize', { prompt: toPrompt(prompt) }, timeoutMs);
  }

  /** Per-token top features; `features` adds their dense values (see denseToArray). */
  activations(prompts, opts = {}) {
    const list = typeof prompts === 'string' ? [prompts] : prompts;
    const request = {
      saeId: opts.saeId || '',
      prompts: list.map((p) => toPrompt(p)),
      topKPerToken: opts.topK === undefined ? 5 : opts.topK,
      featureIds: opts.features || [],
      topKAggregated: opts.topKAggregated === undefined ? 10 : opts.topKAggregated,
      aggregation: enumName(AGGREGATION, opts.aggregation || 'max', 'aggregation'),
    };
    return this._unary('GetFeatureActivations', request, opts.timeoutMs);
  }

  _generateRequest(prompt, opts) {
    const sampling = {
      maxNewTokens: opts.maxNewTokens || 0,
      temperature: opts.temperature || 0,
      topP: opts.topP || 0,
      topK: opts.topK || 0,
      stop: opts.stop || [],
    };
    if (opts.seed !== undefined) sampling.seed = opts.seed;
    return {
      saeId: opts.saeId || '',
      prompt: toPrompt(prompt, true),
      interventions: opts.interventions || [],
      sampling,
      includeBaseline: Boolean(opts.baseline),
      includeLogprobs: Boolean(opts.logprobs),
      includeTrace: Boolean(opts.trace),
    };
  }

  generate(prompt, opts = {}) {
    return this._unary('GenerateSteered', this._generateRequest(prompt, opts), opts.timeoutMs);
  }

  /**
   * Streamed generation: yields {token: TokenEvent} per token, then {done: response}.
   * Leaving the `for await` loop early cancels the call (the server stops decoding).
   */
  async *stream(prompt, opts = {}) {
    const request = this._generateRequest(prompt, opts);
    const call = this.stub.StreamGenerateSteered(request, this.metadata, this._options(opts.timeoutMs));
    let finished = false;
    try {
      for await (const event of call) yield event;
      finished = true;
    } catch (err) {
      finished = true;
      throw err.code === undefined ? err : SaeScopeError.from(err);
    } finally {
      if (!finished) call.cancel();
    }
  }

  contrast(positive, negative, opts = {}) {
    const request = {
      saeId: opts.saeId || '',
      positive: positive.map((p) => toPrompt(p)),
      negative: negative.map((p) => toPrompt(p)),
      aggregation: enumName(AGGREGATION, opts.aggregation || 'max', 'aggregation'),
      topN: opts.topN || 10,
      locationsPerHit: opts.locations || 0,
      // 'output_score': the strongest hits reranked by their effect on the output
      orderBy: enumName(ORDER_BY, opts.orderBy || 'effect_size', 'orderBy'),
      includeOutputScores: Boolean(opts.outputScores),
    };
    return this._unary('SearchFeaturesByContrast', request, opts.timeoutMs);
  }

  /**
   * One feature; where its SAE has a catalog, also `label`, `topExamples` (a page of
   * `opts.examples`, next: `opts.examplesPageToken = response.nextExamplesPageToken`),
   * `quantileExamples` (`opts.quantileExamples` per bin), `histogram` and `cofiring`.
   */
  feature(feature, opts = {}) {
    const request = {
      saeId: opts.saeId || '',
      feature,
      topLogits: opts.topLogits || 10,
      neighbours: opts.neighbours || 10,
      includeDirection: Boolean(opts.direction),
      examplesPageSize: opts.examples || 0,
      examplesPageToken: opts.examplesPageToken || '',
      quantileExamples: opts.quantileExamples || 0,
    };
    return this._unary('GetFeature', request, opts.timeoutMs);
  }

  /**
   * A page of features with their labels and densities (needs a catalog: FAILED_PRECONDITION
   * without one). Filters: `minDensity`, `maxDensity`, `label` (contained, case-insensitive);
   * the next page: `pageToken = response.nextPageToken` (empty on the last page).
   */
  listFeatures(opts = {}) {
    const request = {
      saeId: opts.saeId || '',
      pageSize: opts.pageSize || 0,
      pageToken: opts.pageToken || '',
      labelContains: opts.label || '',
    };
    if (opts.minDensity !== undefined) request.minDensity = opts.minDensity;
    if (opts.maxDensity !== undefined) request.maxDensity = opts.maxDensity;
    return this._unary('ListFeatures', request, opts.timeoutMs);
  }

  /** Every feature that passes `listFeatures`' filters, page after page. */
  async *iterFeatures(opts = {}) {
    let pageToken = '';
    do {
      const page = await this.listFeatures({ ...opts, pageToken });
      yield* page.features;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /**
   * Features for a text query: by their labels and example contexts (BM25, with a catalog)
   * and by how much they fire on `query` itself; each hit's `matched` is 'text', 'activation'
   * or 'both'.
   */
  searchFeatures(query, opts = {}) {
    const request = { saeId: opts.saeId || '', query, topN: opts.topN || 0 };
    return this._unary('SearchFeatures', request, opts.timeoutMs);
  }

  /**
   * Which features make the model predict `opts.target` after `prompt` (a token id, or a text
   * that is one token, e.g. ' Paris'; default: the model's own next token): each feature's
   * attribution (activation × gradient of log p(target)), plus the error, bias, skipped and
   * total nodes. A chat gets the assistant header: the target is then the reply's first token.
   */
  attribute(prompt, opts = {}) {
    const request = { saeId: opts.saeId || '', prompt: toPrompt(prompt, true), topN: opts.topN || 10 };
    const { target } = opts;
    if (typeof target === 'string') request.targetText = target;
    else if (Number.isInteger(target)) request.targetToken = target;
    else if (target !== undefined && target !== null) {
      throw new TypeError(`target: expected a token id or a text, got ${JSON.stringify(target)}`);
    }
    return this._unary('AttributeFeatures', request, opts.timeoutMs);
  }

  close() {
    this.stub.close();
  }
}

module.exports = {
  SaeScopeClient,
  SaeScopeError,
  interventions,
  clamp,
  add,
  multiply,
  ablate,
  direction,
  when,
  MODES,
  arrayToDense,
  SCOPES,
  AGGREGATIONS,
  ORDERS,
  denseToArray,
  toPrompt,
  PROTO_ROOT,
};

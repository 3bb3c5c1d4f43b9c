// The service's API from the page: every RPC as POST api/v1/<Rpc> with the request message as
// proto3 JSON (field names as in saescope.proto), answered the same way; the stream as one JSON
// event per line. Errors carry the gRPC code and its message (saescope/service/web.py).

const KEY = "saescope-api-key";

export class ApiError extends Error {
  constructor(code, message, status) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

function headers() {
  const h = { "content-type": "application/json" };
  const key = apiKey();
  if (key) h["x-api-key"] = key;
  return h;
}

async function failure(response) {
  let body = {};
  try {
    body = await response.json();
  } catch (_) {
    body = { code: "UNKNOWN", message: `HTTP ${response.status}` };
  }
  return new ApiError(body.code || "UNKNOWN", body.message || "", response.status);
}

async function post(rpc, request, signal) {
  const response = await fetch(`api/v1/${rpc}`, {
    method: "POST",
    headers: headers(),
    body: JSON.stringify(request),
    signal,
  });
  if (!response.ok) throw await failure(response);
  return response;
}

// One unary RPC: the response message as an object.
export async function call(rpc, request = {}, signal = undefined) {
  return (await post(rpc, request, signal)).json();
}

// Features' labels and largest catalog values (GetFeature, asked for little else), by id;
// a feature whose lookup fails gets an empty label.
export async function featureSummaries(sae, ids) {
  const small = { top_logits: 1, neighbours: 1, examples_page_size: 1, quantile_examples: 1 };
  const found = await Promise.all(
    ids.map((feature) => call("GetFeature", { sae_id: sae, feature, ...small }).catch(() => null)),
  );
  return new Map(
    ids.map((id, i) => [
      id,
      {
        label: found[i]?.label?.text || "",
        max: found[i]?.top_examples?.length ? Number(found[i].top_examples[0].max_value) : null,
      },
    ]),
  );
}

// A server-streaming RPC: onEvent(event) for each line as it arrives; resolves when the stream
// ends, rejects with an ApiError on a failure (before or during the stream) or when aborted.
export async function stream(rpc, request, onEvent, signal = undefined) {
  const response = await post(rpc, request, signal);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      if (!line) continue;
      const event = JSON.parse(line);
      if (event.error) throw new ApiError(event.error.code, event.error.message, 200);
      onEvent(event);
    }
  }
}

// DenseTensor (proto3 JSON: data as base64 of little-endian float32) ⇄ Float32Array.
export function decodeTensor(tensor) {
  const bytes = Uint8Array.from(atob(tensor.data || ""), (c) => c.charCodeAt(0));
  return new Float32Array(new DataView(bytes.buffer).byteLength / 4).map((_, i) =>
    new DataView(bytes.buffer).getFloat32(4 * i, true),
  );
}

export function encodeTensor(values) {
  const view = new DataView(new ArrayBuffer(4 * values.length));
  values.forEach((v, i) => view.setFloat32(4 * i, v, true));
  let binary = "";
  new Uint8Array(view.buffer).forEach((b) => (binary += String.fromCharCode(b)));
  return { shape: [values.length], data: btoa(binary) };
}

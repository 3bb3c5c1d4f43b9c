// The steering playground: features clamped, added, multiplied or ablated (the SAE's error term
// kept), or a contrast's difference-in-means vector added, over a scope; the unsteered
// baseline and the steered continuation stream side by side (StreamGenerateSteered, same seed).
import { featureSummaries, stream } from "../api.js";
import { showError, state } from "../main.js";
import { featureLink, fmt, h } from "../ui.js";

export const VECTOR = "saescope-vector";
const MODES = ["MODE_CLAMP", "MODE_ADD", "MODE_MULTIPLY", "MODE_ABLATE"];
const SCOPES = ["SCOPE_ALL", "SCOPE_PROMPT", "SCOPE_GENERATED"];
const modeName = (m) => m.replace("MODE_", "").toLowerCase();
const scopeName = (s) => s.replace("SCOPE_", "").toLowerCase();

let running = null; // the AbortController of the stream in flight

function select(cls, options, value, name) {
  const el = h("select", { class: cls });
  options.forEach((o) => el.append(new Option(name(o), o, false, o === value)));
  return el;
}

function featureRow(feature = "", mode = "MODE_CLAMP", value = "") {
  const hint = h("span", { class: "hint muted" });
  const id = h("input", { class: "iv-feature", type: "number", min: 0, value: feature, placeholder: "feature" });
  const val = h("input", { class: "iv-value", type: "number", step: "any", value });
  const row = h(
    "div",
    { class: "iv", dataset: { kind: "feature" } },
    h("label", {}, "feature ", id),
    select("iv-mode", MODES, mode, modeName),
    h("label", {}, "value ", val),
    select("iv-scope", SCOPES, "SCOPE_ALL", scopeName),
    h("button", { type: "button", class: "small", onclick: () => row.remove() }, "✕"),
    hint,
  );
  const look = async () => {
    if (id.value === "") return;
    const feature = Number(id.value);
    const { label, max } = (await featureSummaries(state.sae, [feature])).get(feature);
    hint.replaceChildren(
      featureLink(state.sae, feature, label || `feature ${feature}`),
      max ? ` · catalog max ${fmt(max, 2)}` : "",
    );
    if (val.value === "" && max) val.value = String(Number((2 * max).toPrecision(3)));
  };
  id.addEventListener("change", look);
  if (feature !== "") look();
  return row;
}

function vectorRow(saved, strength = 4) {
  return h(
    "div",
    { class: "iv", dataset: { kind: "direction" } },
    h("span", {}, `difference-in-means vector: ${saved.description} (‖v‖ ${fmt(saved.norm, 3)}) × `),
    h("input", { class: "iv-value", type: "number", step: "any", value: strength }),
    select("iv-scope", SCOPES, "SCOPE_ALL", scopeName),
    h("button", { type: "button", class: "small", onclick: (e) => e.target.parentElement.remove() }, "✕"),
  );
}

function interventions(list) {
  const saved = JSON.parse(sessionStorage.getItem(VECTOR) || "null");
  return [...list.querySelectorAll(".iv")].map((row) => {
    const value = Number(row.querySelector(".iv-value").value || 0);
    const scope = row.querySelector(".iv-scope").value;
    if (row.dataset.kind === "direction") {
      return { mode: "MODE_DIRECTION", value, scope, direction: saved.tensor };
    }
    return {
      feature: Number(row.querySelector(".iv-feature").value),
      mode: row.querySelector(".iv-mode").value,
      value,
      scope,
    };
  });
}

export async function steerPage(main, { query }) {
  const chat = Boolean(state.info.has_chat_template);
  const prompt = h("textarea", { id: "steer-prompt", rows: 3 }, query.get("prompt") || "Tell me about your morning.");
  const asChat = h("input", { id: "as-chat", type: "checkbox", checked: chat });
  const list = h("div", { id: "interventions" });
  if (query.get("f")) list.append(featureRow(query.get("f")));
  const saved = JSON.parse(sessionStorage.getItem(VECTOR) || "null");
  if (query.get("vector") && saved) list.append(vectorRow(saved));
  if (!list.children.length) list.append(featureRow());
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, value: 32 });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, step: "0.1", value: 0.7 });
  const seed = h("input", { id: "seed", type: "number", min: 0, value: 1 });
  const baseline = h("div", { id: "baseline-text", class: "completion" });
  const steered = h("div", { id: "steered-text", class: "completion" });
  const status = h("p", { id: "steer-status", class: "muted" });
  const output = h(
    "div",
    { id: "steer-output", class: "columns", dataset: { state: "idle" } },
    h("section", {}, h("h2", {}, "Baseline"), baseline),
    h("section", {}, h("h2", {}, "Steered"), steered),
  );
  const stop = h("button", { type: "button", id: "stop", disabled: true, onclick: () => running?.abort() }, "Stop");
  const go = h("button", { type: "submit", id: "generate" }, "Generate");
  const form = h(
    "form",
    {
      onsubmit: async (e) => {
        e.preventDefault();
        go.disabled = true;
        stop.disabled = false;
        try {
          showError(null);
          await generate();
        } catch (err) {
          showError(err);
        } finally {
          go.disabled = false;
          stop.disabled = true;
        }
      },
    },
    prompt,
    h("label", { class: "inline" }, asChat, " as a chat (template applied)"),
    h("h2", {}, "Interventions"),
    list,
    h("div", { class: "bar" },
      h("button", { type: "button", class: "small", onclick: () => list.append(featureRow()) }, "+ feature"),
      saved ? h("button", { type: "button", class: "small", onclick: () => list.append(vectorRow(saved)) }, "+ contrast vector") : null,
    ),
    h("div", { class: "bar" },
      h("label", {}, "new tokens ", maxTokens),
      h("label", {}, "temperature ", temperature),
      h("label", {}, "seed ", seed),
      go,
      stop,
    ),
  );

  async function generate() {
    baseline.textContent = "";
    steered.textContent = "";
    const text = prompt.value;
    const request = {
      sae_id: state.sae,
      prompt: asChat.checked
        ? { chat: { messages: [{ role: "user", content: text }], add_generation_prompt: true } }
        : { text },
      interventions: interventions(list),
      sampling: {
        max_new_tokens: Number(maxTokens.value),
        temperature: Number(temperature.value),
        seed: String(seed.value || 0),
      },
      include_baseline: true,
    };
    running = new AbortController();
    const start = performance.now();
    let first = null;
    let count = 0;
    output.dataset.state = "streaming";
    status.textContent = "waiting for the first token…";
    try {
      await stream(
        "StreamGenerateSteered",
        request,
        (event) => {
          if (event.token) {
            if (first === null) {
              first = performance.now() - start;
              output.dataset.firstTokenMs = String(Math.round(first));
            }
            count += 1;
            const target = event.token.branch === "BRANCH_BASELINE" ? baseline : steered;
            target.append(h("span", { class: "gen", title: `token ${event.token.index}` }, event.token.text));
            output.dataset.tokens = String(count);
            const s = (performance.now() - start) / 1000;
            status.textContent = `first token after ${Math.round(first)} ms · ${count} tokens · ${fmt(count / s, 3)} tokens/s`;
          } else if (event.done) {
            const reason = (c) => (c ? c.finish_reason.replace("FINISH_REASON_", "").toLowerCase() : "");
            status.textContent += ` · done (steered: ${reason(event.done.steered)}, baseline: ${reason(event.done.baseline)})`;
            output.dataset.state = "done";
          }
        },
        running.signal,
      );
    } catch (err) {
      if (err.name === "AbortError") {
        output.dataset.state = "stopped";
        status.textContent += " · stopped";
        return;
      }
      output.dataset.state = "error";
      throw err;
    } finally {
      running = null;
    }
  }

  main.append(h("h1", {}, "Steer"), form, status, output);
}

// The prompt page: a text's tokens with their strongest features (GetFeatureActivations).
// Positions the SAE never saw in training (the attention sink, norm outliers) are marked and
// left out of the prompt's top features; click a token for its features, a feature to shade
// the text by its value, or its number for its page.
import { call, decodeTensor, featureSummaries } from "../api.js";
import { showError, state } from "../main.js";
import { featureLink, fmt, h, section, shown, table, tokenRow } from "../ui.js";

const TOP_PER_TOKEN = 8;
const TOP_FEATURES = 12;

export async function promptPage(main, { query }) {
  const text = h("textarea", { id: "prompt-text", rows: 4 }, query.get("text") || "");
  const out = h("div", { id: "prompt-result" });
  const form = h(
    "form",
    {
      onsubmit: async (e) => {
        e.preventDefault();
        showError(null);
        await analyse(out, text.value).catch((err) => {
          out.replaceChildren();
          showError(err);
        });
      },
    },
    text,
    h("div", { class: "bar" }, h("button", { type: "submit", id: "analyse" }, "Show features")),
  );
  main.append(h("h1", {}, "What fires on a prompt"), form, out);
  if (text.value) await analyse(out, text.value);
}

async function analyse(out, text) {
  out.replaceChildren(h("p", { class: "muted" }, "Running…"));
  const res = await call("GetFeatureActivations", {
    sae_id: state.sae,
    prompts: [{ text }],
    top_k_per_token: TOP_PER_TOKEN,
    top_k_aggregated: TOP_FEATURES,
  });
  const p = res.prompts[0];
  const ood = p.out_of_distribution || [];
  const detail = h("div", { id: "token-detail" }, h("p", { class: "muted" }, "Click a token."));
  const strongest = p.token_top_features.map((s) => Number((s.values || [0])[0] || 0));
  const tokens = tokenRow(p.tokens, strongest, Math.max(1e-9, ...strongest.filter((_, i) => !ood[i])));
  tokens.id = "prompt-tokens";
  [...tokens.children].forEach((span, i) => {
    if (ood[i]) {
      span.classList.add("sink");
      span.title = `${JSON.stringify(p.tokens[i].text)}: never seen by the SAE in training (attention sink or norm outlier); its values are not meaningful`;
    }
    if (p.tokens[i].special) span.classList.add("special");
    span.addEventListener("click", () => showToken(detail, p, i, tokens));
  });
  const top = p.top_features || { features: [], values: [] };
  const names = await featureSummaries(state.sae, top.features);
  const list = table(
    ["feature", "label", "max", ""],
    top.features.map((f, i) => [
      featureLink(state.sae, f),
      names.get(f).label || h("span", { class: "muted" }, "(no label)"),
      fmt(top.values[i]),
      h("button", { type: "button", class: "small", onclick: () => shade(tokens, text, f).catch(showError) }, "shade text"),
    ]),
    { id: "prompt-top", class: "hits" },
  );
  out.replaceChildren(
    h("p", { class: "muted" }, "Shaded by each token's strongest feature; struck-through tokens were never seen by the SAE in training."),
    tokens,
    h("div", { class: "columns" }, section("This token", detail), section("The prompt's top features", list)),
  );
}

function showToken(detail, p, i, tokens) {
  tokens.querySelectorAll(".selected").forEach((s) => s.classList.remove("selected"));
  tokens.children[i].classList.add("selected");
  const s = p.token_top_features[i] || { features: [], values: [] };
  const note = p.out_of_distribution?.[i]
    ? h("p", { class: "warn" }, "Never seen by the SAE in training: values not meaningful.")
    : null;
  detail.replaceChildren(
    h("p", {}, h("code", {}, shown(p.tokens[i].text)), ` (position ${i}, id ${p.tokens[i].id}), residual error ${fmt(p.error_norms[i])} of ‖x‖ ${fmt(p.residual_norms[i])}`),
    note,
    table(
      ["feature", "value"],
      s.features.map((f, j) => [featureLink(state.sae, f), fmt(s.values[j])]),
      { class: "scores", id: "token-features" },
    ),
  );
}

async function shade(tokens, text, feature) {
  const res = await call("GetFeatureActivations", {
    sae_id: state.sae,
    prompts: [{ text }],
    feature_ids: [feature],
  });
  const p = res.prompts[0];
  const values = Array.from(decodeTensor(p.feature_values));
  const ood = p.out_of_distribution || [];
  const max = Math.max(1e-9, ...values.filter((_, i) => !ood[i]));
  const fresh = tokenRow(p.tokens, values, max);
  [...tokens.children].forEach((span, i) => {
    span.style.background = fresh.children[i].style.background;
    span.title = `${JSON.stringify(p.tokens[i].text)}: feature ${feature} = ${fmt(values[i])}`;
  });
  tokens.dataset.shadedBy = String(feature);
}


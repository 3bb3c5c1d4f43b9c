// A feature's page: its label and how well the label predicts it, the activation histogram,
// top examples (paged) and examples from each activation quantile with the firing tokens
// shaded by value, the output tokens it promotes and suppresses, and its neighbours.
import { call } from "../api.js";
import { showError, state } from "../main.js";
import { featureLink, fmt, h, histogram, pct, section, shown, table, tokenRow } from "../ui.js";

function example(ex, max) {
  return h(
    "div",
    { class: "example" },
    h("span", { class: "example-max" }, fmt(ex.max_value, 2)),
    tokenRow(ex.tokens, ex.values, max, { peak: ex.max_position }),
  );
}

function scores(list) {
  return table(
    ["token", "score"],
    list.map((t) => [h("code", {}, shown(t.token)), fmt(t.score, 3)]),
    { class: "scores" },
  );
}

function neighbours(sae, list, what) {
  return table(
    ["feature", what],
    list.map((n) => [featureLink(sae, n.feature), fmt(n.cosine, 3)]),
    { class: "scores" },
  );
}

function labelBlock(f) {
  const label = f.label || {};
  const d = label.detection;
  const langs = Object.entries(label.languages || {})
    .sort((a, b) => b[1] - a[1])
    .slice(0, 5)
    .map(([k, v]) => `${k} ${pct(v)}`)
    .join(" · ");
  return h(
    "div",
    { class: "label" },
    h("p", { id: "feature-label", class: "label-text" }, label.text || "(no label)"),
    d
      ? h(
          "p",
          { id: "label-score", class: "muted" },
          `label detection F1 ${fmt(d.f1, 2)} (precision ${fmt(d.precision, 2)}, recall ${fmt(d.recall, 2)}) on ${d.positives} held-out firings and ${d.negatives} non-firings`,
        )
      : h("p", { id: "label-score", class: "muted" }, "label not scored (too few held-out firings)"),
    label.explanation ? h("p", { class: "explanation" }, label.explanation) : null,
    langs ? h("p", { class: "muted" }, `fires in: ${langs}`) : null,
  );
}

export async function featurePage(main, { parts }) {
  const sae = parts.length > 1 ? parts[0] : state.sae;
  const feature = Number(parts.length > 1 ? parts[1] : parts[0]);
  const request = {
    sae_id: sae,
    feature,
    top_logits: 10,
    neighbours: 10,
    examples_page_size: 8,
    quantile_examples: 3,
  };
  const f = await call("GetFeature", request);
  const max = f.top_examples.length ? Number(f.top_examples[0].max_value) : 1;
  const examples = h("div", { id: "top-examples" }, f.top_examples.map((ex) => example(ex, max)));
  let next = f.next_examples_page_token;
  const more = h("button", { type: "button", id: "more-examples", hidden: !next }, "More examples");
  more.addEventListener("click", async () => {
    const page = await call("GetFeature", { ...request, examples_page_token: next }).catch(showError);
    if (!page) return;
    page.top_examples.forEach((ex) => examples.append(example(ex, max)));
    next = page.next_examples_page_token;
    more.hidden = !next;
  });
  const hasCatalog = Number(f.catalog_tokens) > 0;
  main.append(
    h(
      "div",
      { class: "title" },
      h("h1", {}, `Feature ${f.feature}`),
      h("span", { class: "muted" }, sae),
      h("a", { class: "button", id: "steer-with", href: `#/steer?f=${f.feature}` }, "Steer with it"),
    ),
    labelBlock(f),
    h(
      "p",
      { class: "facts" },
      `density ${pct(f.density)} · decoder norm ${fmt(f.decoder_norm)} · encoder bias ${fmt(f.encoder_bias)}` +
        (hasCatalog ? ` · catalog of ${Number(f.catalog_tokens).toLocaleString()} tokens` : ""),
    ),
    hasCatalog
      ? h(
          "div",
          { class: "columns" },
          section("Activation histogram", histogram(f.histogram || {})),
          section(
            "Label evidence",
            scores((f.label && f.label.tokens) || []),
            (f.label && f.label.ngrams && f.label.ngrams.length) ? scores(f.label.ngrams) : null,
          ),
        )
      : h("p", { class: "muted" }, "No catalog for this SAE: no examples, histogram or label."),
    hasCatalog ? section("Top activating examples", examples, more) : null,
    hasCatalog && f.quantile_examples.length
      ? section(
          "Examples by activation quantile",
          h(
            "div",
            { id: "quantiles" },
            f.quantile_examples
              .slice()
              .reverse()
              .map((bin) =>
                h(
                  "div",
                  { class: "quantile" },
                  h("h3", {}, `[${fmt(bin.lower, 2)}, ${fmt(bin.upper, 2)})`),
                  bin.examples.map((ex) => example(ex, max)),
                ),
              ),
          ),
        )
      : null,
    h(
      "div",
      { class: "columns" },
      section("Promotes", h("div", { id: "promoted" }, scores(f.promoted))),
      section("Suppresses", h("div", { id: "suppressed" }, scores(f.suppressed))),
      section("Nearest by decoder", neighbours(sae, f.nearest, "cosine")),
      hasCatalog ? section("Fires with", neighbours(sae, f.cofiring, "P(it | this)")) : null,
    ),
  );
  main.dataset.rendered = String(f.feature);
  performance.mark("feature-rendered");
}

// The contrast page: two prompt sets (one per line), SearchFeaturesByContrast, both directions'
// hits with their statistics and where they fire; the difference in means of the residual
// stream is kept for the steering playground.
import { call, featureSummaries } from "../api.js";
import { showError, state } from "../main.js";
import { featureLink, fmt, h, pct, section, shown, table } from "../ui.js";
import { VECTOR } from "./steer.js";

const EXAMPLE_POS = ["I love the ocean and its waves.", "The sea was calm at dawn.", "We sailed across the bay.", "Fish swim in the deep sea."];
const EXAMPLE_NEG = ["I love the city and its streets.", "The road was busy at dawn.", "We walked across the park.", "Birds sit in the tall trees."];

function lines(textarea) {
  return textarea.value.split("\n").map((s) => s.trim()).filter(Boolean);
}

function where(hit) {
  return h(
    "span",
    { class: "where" },
    hit.locations.map((l) =>
      h("span", { class: "tok on", title: `prompt ${l.prompt_index + 1}, token ${l.token_index}: ${fmt(l.value)}` }, shown(l.token)),
    ),
  );
}

function hits(list, names, id) {
  return table(
    ["feature", "label", "mean +", "mean −", "effect g", "AUROC", "p (BH)", "active + / −", "fires on", ""],
    list.map((hit) => [
      featureLink(state.sae, hit.feature),
      names.get(hit.feature).label,
      fmt(hit.mean_positive),
      fmt(hit.mean_negative),
      fmt(hit.effect_size, 2),
      fmt(hit.auroc, 3),
      fmt(hit.p_value_corrected),
      `${pct(hit.frac_active_positive)} / ${pct(hit.frac_active_negative)}`,
      where(hit),
      h("a", { href: `#/steer?f=${hit.feature}`, class: "small" }, "steer"),
    ]),
    { id, class: "hits" },
  );
}

export async function contrastPage(main) {
  const positive = h("textarea", { id: "positive", rows: 6 }, EXAMPLE_POS.join("\n"));
  const negative = h("textarea", { id: "negative", rows: 6 }, EXAMPLE_NEG.join("\n"));
  const aggregation = h("select", { id: "aggregation" });
  aggregation.append(new Option("max over tokens", "AGGREGATION_MAX"), new Option("mean over tokens", "AGGREGATION_MEAN"));
  const topN = h("input", { id: "top-n", type: "number", min: 1, value: 10 });
  const out = h("div", { id: "contrast-result" });
  const form = h(
    "form",
    {
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          await run();
        } catch (err) {
          out.replaceChildren();
          showError(err);
        }
      },
    },
    h("div", { class: "columns" },
      h("label", { class: "stack" }, "With the concept (one prompt per line)", positive),
      h("label", { class: "stack" }, "Without it", negative),
    ),
    h("div", { class: "bar" },
      h("label", {}, "aggregate ", aggregation),
      h("label", {}, "hits per direction ", topN),
      h("button", { type: "submit", id: "contrast-run" }, "Contrast"),
    ),
  );

  async function run() {
    showError(null);
    out.replaceChildren(h("p", { class: "muted" }, "Running…"));
    const pos = lines(positive), neg = lines(negative);
    const res = await call("SearchFeaturesByContrast", {
      sae_id: state.sae,
      positive: pos.map((text) => ({ text })),
      negative: neg.map((text) => ({ text })),
      aggregation: aggregation.value,
      top_n: Number(topN.value),
      locations_per_hit: 3,
    });
    const names = await featureSummaries(
      state.sae,
      [...res.positive_hits, ...res.negative_hits].map((x) => x.feature),
    );
    const steer = h("button", {
      type: "button",
      id: "steer-vector",
      onclick: () => {
        sessionStorage.setItem(VECTOR, JSON.stringify({
          tensor: res.difference_in_means,
          norm: res.difference_in_means_norm,
          description: `“${pos[0].slice(0, 30)}…” − “${neg[0].slice(0, 30)}…”`,
        }));
        location.hash = "#/steer?vector=1";
      },
    }, "Steer with the difference in means");
    out.replaceChildren(
      h("p", { class: "muted", id: "contrast-summary" },
        `${res.features_tested} features tested (active somewhere); p-values corrected over all of them. ‖difference in means‖ = ${fmt(res.difference_in_means_norm)}. `,
        steer),
      section("More active with the concept", hits(res.positive_hits, names, "positive-hits")),
      section("More active without it", hits(res.negative_hits, names, "negative-hits")),
    );
  }

  main.append(h("h1", {}, "Contrast two prompt sets"), form, out);
}

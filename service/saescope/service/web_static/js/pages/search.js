// Search: SearchFeatures for a query (labels and example contexts by BM25, fused with what
// fires on the query itself); with no query, the catalog's features in order (ListFeatures).
import { call } from "../api.js";
import { saeInfo, state } from "../main.js";
import { featureLink, fmt, h, pct, table } from "../ui.js";

export async function searchPage(main, { query }) {
  const q = query.get("q") || "";
  const input = h("input", {
    id: "search-query",
    type: "search",
    value: q,
    placeholder: "a concept, a word, a phrase… e.g. ocean",
    autofocus: true,
  });
  const form = h(
    "form",
    {
      class: "bar",
      onsubmit: (e) => {
        e.preventDefault();
        location.hash = `#/search?q=${encodeURIComponent(input.value.trim())}`;
      },
    },
    input,
    h("button", { type: "submit", id: "search-button" }, "Search"),
  );
  const results = h("div", { id: "search-results" });
  main.append(h("h1", {}, "Find a feature"), form, results);
  if (!saeInfo().has_catalog) {
    results.append(
      h("p", { class: "muted" }, "This SAE has no catalog: hits come from what fires on the query only (build one with `saescope catalog`)."),
    );
  }
  if (q) {
    const res = await call("SearchFeatures", { sae_id: state.sae, query: q, top_n: 20 });
    results.append(
      h("p", { class: "muted" }, `${res.hits.length} features for “${q}”`),
      table(
        ["feature", "label", "density", "score", "matched"],
        res.hits.map((hit) => [
          featureLink(state.sae, hit.feature),
          hit.label || h("span", { class: "muted" }, "(no label)"),
          pct(hit.density),
          fmt(hit.score),
          hit.matched,
        ]),
        { class: "hits", id: "search-hits" },
      ),
    );
    return;
  }
  if (saeInfo().has_catalog) {
    const res = await call("ListFeatures", { sae_id: state.sae, page_size: 30 });
    results.append(
      h("p", { class: "muted" }, `${res.total} features; the first ${res.features.length}:`),
      table(
        ["feature", "label", "label F1", "density", "max"],
        res.features.map((f) => [
          featureLink(state.sae, f.feature),
          f.label || h("span", { class: "muted" }, "(never fired)"),
          fmt(f.label_f1, 2),
          pct(f.density),
          fmt(f.max_value),
        ]),
        { class: "hits" },
      ),
    );
  }
}

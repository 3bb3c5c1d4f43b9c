// Small DOM helpers shared by the pages: element building, tokens highlighted by value, the
// activation histogram, number formats.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function fmt(x, digits = 3) {
  if (x === undefined || x === null || x === "") return "–";
  const n = Number(x);
  if (!Number.isFinite(n)) return String(x);
  if (n !== 0 && (Math.abs(n) < 1e-3 || Math.abs(n) >= 1e5)) return n.toExponential(2);
  return n.toFixed(digits).replace(/\.?0+$/, "") || "0";
}

export function pct(x) {
  return x === undefined || x === null ? "–" : `${fmt(100 * Number(x), 3)}%`;
}

// A token's text as shown: whitespace made visible where it is the whole token.
export function shown(text) {
  if (text === "") return "∅";
  return text.replace(/\n/g, "⏎").replace(/\t/g, "⇥");
}

// Tokens as spans, each shaded by value / max (orange), its value in the tooltip.
export function tokenRow(tokens, values, max, opts = {}) {
  const row = h("div", { class: "tokens" });
  tokens.forEach((t, i) => {
    const v = values ? Number(values[i] || 0) : 0;
    const a = max > 0 ? Math.max(0, Math.min(1, v / max)) : 0;
    const span = h(
      "span",
      {
        class: "tok" + (v > 0 ? " on" : "") + (opts.peak === i ? " peak" : ""),
        title: values ? `${JSON.stringify(t.text)}: ${fmt(v)}` : JSON.stringify(t.text),
        dataset: { value: String(v), index: String(i) },
      },
      shown(t.text),
    );
    if (a > 0) span.style.background = `rgba(255, 140, 0, ${0.15 + 0.85 * a})`;
    row.append(span);
  });
  return row;
}

// The activation histogram: bars of log(1 + count) over the bins' edges, as an SVG.
export function histogram(hist) {
  const counts = (hist.counts || []).map(Number);
  const edges = (hist.edges || []).map(Number);
  const W = 360, H = 120, pad = 18;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H + pad}`);
  svg.setAttribute("class", "histogram");
  const top = Math.max(1, ...counts.map((c) => Math.log1p(c)));
  const bw = W / Math.max(1, counts.length);
  counts.forEach((c, i) => {
    const bh = (H * Math.log1p(c)) / top;
    const r = document.createElementNS(svg.namespaceURI, "rect");
    r.setAttribute("x", String(i * bw + 0.5));
    r.setAttribute("y", String(H - bh));
    r.setAttribute("width", String(Math.max(1, bw - 1)));
    r.setAttribute("height", String(bh));
    r.setAttribute("class", "bar");
    const title = document.createElementNS(svg.namespaceURI, "title");
    const hi = i + 1 < edges.length ? fmt(edges[i + 1]) : "∞";
    title.textContent = `[${fmt(edges[i])}, ${hi}): ${c}`;
    r.append(title);
    svg.append(r);
  });
  for (const [x, text, anchor] of [
    [0, fmt(edges[0] ?? 0), "start"],
    [W, fmt(edges[edges.length - 1] ?? 0), "end"],
  ]) {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", String(x));
    t.setAttribute("y", String(H + pad - 4));
    t.setAttribute("text-anchor", anchor);
    t.textContent = text;
    svg.append(t);
  }
  return svg;
}

export function featureLink(sae, feature, text) {
  return h(
    "a",
    { href: `#/feature/${encodeURIComponent(sae)}/${feature}`, class: "feature-link" },
    text ?? `#${feature}`,
  );
}

export function table(head, rows, attrs = {}) {
  return h(
    "table",
    attrs,
    h("thead", {}, h("tr", {}, head.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((x) => h("td", {}, x))))),
  );
}

export function section(title, ...children) {
  return h("section", {}, h("h2", {}, title), ...children);
}

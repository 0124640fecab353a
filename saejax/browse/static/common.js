"use strict";
// Shared by index.html and feature.html. The data arrives as JavaScript files (Chrome refuses
// fetch/XHR of file:// URLs), each calling one of the registration functions below.
const SAEJAX = {
  data: { meta: null, chunks: [], features: new Map() },
  meta(m) { SAEJAX.data.meta = m; },
  chunk(i, columns) { SAEJAX.data.chunks[i] = columns; },
  features(list) { for (const f of list) SAEJAX.data.features.set(f.id, f); },
};

/** Load a data file with <script src>; resolves once it has run. */
function loadScript(src) {
  return new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = src;
    s.onload = () => { s.remove(); resolve(); };
    s.onerror = () => { s.remove(); reject(new Error(`could not load ${src}`)); };
    document.head.append(s);
  });
}

/** An element with DOM properties set; string children become text nodes (never HTML). */
function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

const $ = (id) => document.getElementById(id);
const isNum = (x) => typeof x === "number" && Number.isFinite(x);

/** Numbers to 4 significant digits (exponent when tiny or huge); null/NaN as a dash. */
function fmt(x) {
  if (typeof x === "boolean") return String(x);
  if (typeof x !== "number") return x === null || x === undefined ? "—" : String(x);
  if (Number.isNaN(x)) return "—";
  if (!Number.isFinite(x) || Number.isInteger(x)) return x.toLocaleString("en-US");
  const a = Math.abs(x);
  return a < 1e-3 || a >= 1e6 ? x.toExponential(2) : String(Number(x.toPrecision(4)));
}

/** Density as "1.2e-4 (1 in 8,333 tokens)". */
function fmtDensity(d) {
  return isNum(d) && d > 0 ? `${fmt(d)} (1 in ${Math.round(1 / d).toLocaleString("en-US")} tokens)` : fmt(d);
}

/** Rows of [key, value] into a two-column table. */
function fillKv(table, pairs) {
  table.replaceChildren(...pairs.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, fmt(v)))));
}

/** Show a failure where the page's status line is. */
function showError(e) {
  console.error(e);
  const status = $("status");
  status.hidden = false;
  status.className = "status error";
  status.textContent = `Error: ${e.message}`;
}

/**
 * A histogram as an SVG: bars over log10 edges (ticks at powers of ten), a <title> per bar
 * giving its range and count. opts: {label, range(lo, hi) -> text}.
 */
function histogram(edges, counts, opts) {
  const W = 640, H = 170, L = 48, R = 12, T = 10, B = 38;
  const lo = edges[0], hi = edges[edges.length - 1];
  const x = (v) => L + ((v - lo) / (hi - lo || 1)) * (W - L - R);
  const top = Math.max(1, ...counts);
  const y = (c) => T + (1 - c / top) * (H - T - B);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "hist", role: "img", "aria-label": opts.label });
  counts.forEach((c, i) => {
    const x0 = x(edges[i]), x1 = x(edges[i + 1]);
    svg.append(svgEl("rect", { x: x0 + 0.5, y: y(c), width: Math.max(0.5, x1 - x0 - 1), height: y(0) - y(c) },
      svgEl("title", {}, `${opts.range(edges[i], edges[i + 1])}: ${c.toLocaleString("en-US")}`)));
  });
  svg.append(svgEl("line", { x1: L, x2: W - R, y1: y(0), y2: y(0), class: "axis" }));
  for (let k = Math.ceil(lo); k <= Math.floor(hi); k++) {
    svg.append(svgEl("line", { x1: x(k), x2: x(k), y1: y(0), y2: y(0) + 4, class: "axis" }));
    svg.append(svgEl("text", { x: x(k), y: y(0) + 16, "text-anchor": "middle" }, `1e${k}`));
  }
  svg.append(svgEl("text", { x: L - 6, y: T + 8, "text-anchor": "end" }, top.toLocaleString("en-US")));
  svg.append(svgEl("text", { x: L - 6, y: y(0), "text-anchor": "end" }, "0"));
  svg.append(svgEl("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "label" }, opts.label));
  return svg;
}

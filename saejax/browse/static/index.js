"use strict";
// The index page: SAE summary, density histogram, and the feature table. The table holds every
// feature (loaded chunk by chunk) but renders one page of PAGE_SIZE rows at a time; its state
// (sort, filter, page) lives in the URL hash so the back button returns to the same view.
const PAGE_SIZE = 100;
const COLUMNS = [
  { key: "id", label: "feature", desc: false },
  { key: "density", label: "density", desc: true },
  { key: "max_act", label: "max act", desc: true },
  { key: "mean_act", label: "mean act", desc: true },
  { key: "score", label: "score", desc: true },
  { key: "explanation", label: "explanation" },  // not sortable: filter it instead
];
const state = { sort: "id", desc: false, page: 0, q: "", hideDead: false };
let table = null;  // {column: [value per feature]}, all chunks joined

async function main() {
  const meta = SAEJAX.data.meta;
  if (!meta) throw new Error("data/meta.js did not load: write the site with saejax.browse.write_site");
  fillKv($("summary"), meta.summary);
  if (meta.eval) { fillKv($("eval-table"), meta.eval); $("eval").hidden = false; }
  await Promise.all(meta.chunks.map(loadScript));
  table = joinChunks(SAEJAX.data.chunks);
  $("density").append(densityHistogram(table, meta.n_dead));
  readHash();
  buildHeader();
  bindControls();
  update();
  $("status").hidden = true;
}

function joinChunks(chunks) {
  const t = {};
  for (const key of Object.keys(chunks[0] || { id: [] })) t[key] = [].concat(...chunks.map((c) => c[key]));
  t.search = (t.explanation || []).map((e) => (e || "").toLowerCase());  // lowercased once, for the filter
  return t;
}

/** Histogram of log10 density over the features that fired, 5 bins per decade. */
function densityHistogram(t, nDead) {
  const logs = t.density.filter((d, i) => t.n_fired[i] > 0 && d > 0).map(Math.log10);
  if (!logs.length) return el("p", { className: "empty" }, "No feature fired.");
  // a loop, not Math.min(...logs): spreading 100k+ arguments overflows the stack
  let min = Infinity, max = -Infinity;
  for (const v of logs) { min = Math.min(min, v); max = Math.max(max, v); }
  const lo = Math.floor(min), hi = Math.max(lo + 1, Math.ceil(max));
  const perDecade = 5, n = (hi - lo) * perDecade;
  const edges = Array.from({ length: n + 1 }, (_, i) => lo + i / perDecade);
  const counts = new Array(n).fill(0);
  for (const v of logs) counts[Math.min(n - 1, Math.floor((v - lo) * perDecade))]++;
  const range = (a, b) => `density 1e${a.toFixed(1)} to 1e${b.toFixed(1)}`;
  return el("div", {}, histogram(edges, counts, { label: "feature density (fraction of tokens, log scale)", range }),
    el("p", { className: "note" }, `Not shown: ${nDead.toLocaleString("en-US")} dead (never fired).`));
}

function buildHeader() {
  const row = document.querySelector("#features thead tr");
  row.replaceChildren(...COLUMNS.map((c) => {
    const th = el("th", {});
    th.dataset.key = c.key;
    if (!("desc" in c)) { th.append(c.label); return th; }
    th.append(el("button", {
      type: "button", title: `sort by ${c.label}`,
      onclick: () => {
        state.desc = state.sort === c.key ? !state.desc : c.desc;
        state.sort = c.key;
        state.page = 0;
        update();
      },
    }, c.label, el("span", { className: "arrow" })));
    return th;
  }));
}

function bindControls() {
  const filter = $("filter"), hide = $("hide-dead");
  filter.value = state.q;
  hide.checked = state.hideDead;
  filter.addEventListener("input", () => { state.q = filter.value; state.page = 0; update(); });
  hide.addEventListener("change", () => { state.hideDead = hide.checked; state.page = 0; update(); });
}

/** Filter and sort every feature, then render the current page. */
function update() {
  const q = state.q.trim().toLowerCase();
  const id = /^\d+$/.test(q) ? Number(q) : null;
  const rows = [];
  for (let i = 0; i < table.id.length; i++) {
    if (state.hideDead && table.n_fired[i] === 0) continue;
    if (q && table.id[i] !== id && !table.search[i].includes(q)) continue;
    rows.push(i);
  }
  rows.sort(compare(table[state.sort], state.desc));
  const pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
  state.page = Math.min(Math.max(0, state.page), pages - 1);
  const start = state.page * PAGE_SIZE;
  document.querySelector("#features tbody").replaceChildren(...rows.slice(start, start + PAGE_SIZE).map(rowEl));
  for (const th of document.querySelectorAll("#features th")) {
    const sorted = th.dataset.key === state.sort;
    th.setAttribute("aria-sort", sorted ? (state.desc ? "descending" : "ascending") : "none");
    const arrow = th.querySelector(".arrow");
    if (arrow) arrow.textContent = sorted ? (state.desc ? " ▼" : " ▲") : "";
  }
  $("count").textContent = `${fmt(rows.length)} of ${fmt(table.id.length)} features`;
  renderPager(pages);
  writeHash();
}

/** Row order by one column; missing values (null, NaN) last either way, ties by table order. */
function compare(col, desc) {
  return (a, b) => {
    const x = col[a], y = col[b], xn = !isNum(x), yn = !isNum(y);
    if (xn || yn) return xn - yn || a - b;
    return (desc ? y - x : x - y) || a - b;
  };
}

function rowEl(i) {
  const id = table.id[i], dead = table.n_fired[i] === 0, expl = table.explanation[i] || "";
  const num = (v, title) => el("td", { className: "num", title: title || "" }, fmt(v));
  return el("tr", { className: dead ? "dead" : "" },
    el("td", { className: "num" }, el("a", { href: `feature.html#${id}` }, String(id))),
    dead ? el("td", { className: "num", title: "never fired" }, "dead")
         : num(table.density[i], `fired on ${fmt(table.n_fired[i])} tokens`),
    num(table.max_act[i]), num(table.mean_act[i]), num(table.score[i]),
    el("td", { className: "expl", title: expl, dir: "auto" }, expl));
}

function renderPager(pages) {
  const go = (label, page, title) => el("button", {
    type: "button", title, disabled: page < 0 || page >= pages || page === state.page,
    onclick: () => { state.page = page; update(); window.scrollTo(0, $("features").offsetTop - 60); },
  }, label);
  $("pager").replaceChildren(go("«", 0, "first page"), go("‹", state.page - 1, "previous page"),
    el("span", {}, ` page ${state.page + 1} of ${pages} `),
    go("›", state.page + 1, "next page"), go("»", pages - 1, "last page"));
}

function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  if (COLUMNS.some((c) => c.key === p.get("sort") && "desc" in c)) state.sort = p.get("sort");
  state.desc = p.get("desc") === "1";
  state.page = Math.max(0, Number(p.get("page")) - 1 || 0);
  state.q = p.get("q") || "";
  state.hideDead = p.get("alive") === "1";
}

function writeHash() {
  const p = new URLSearchParams({ sort: state.sort, desc: state.desc ? "1" : "0", page: String(state.page + 1) });
  if (state.q) p.set("q", state.q);
  if (state.hideDead) p.set("alive", "1");
  history.replaceState(null, "", `#${p}`);
}

main().catch(showError);

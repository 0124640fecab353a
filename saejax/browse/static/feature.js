"use strict";
// The feature page, feature.html#ID: statistics, explanation, activation histogram, logit
// effects, and examples with every token shaded by the feature's activation on it.
// Navigating (prev/next, arrow keys, the go-to box) changes only the hash: no reload.
const BEFORE = 24, AFTER = 8;  // tokens shown around an example's focus until expanded
let current = null;  // the feature shown

async function show() {
  const meta = SAEJAX.data.meta;
  if (!meta) throw new Error("data/meta.js did not load: write the site with saejax.browse.write_site");
  const hash = decodeURIComponent(location.hash.slice(1));
  if (!hash && meta.first_id === null) throw new Error("this analysis holds no features");
  if (hash && !/^\d+$/.test(hash)) throw new Error(`"${hash}" is not a feature id`);
  const id = hash ? Number(hash) : meta.first_id;
  if (!SAEJAX.data.features.has(id)) {
    await loadScript(`data/features/${Math.floor(id / meta.bundle)}.js`).catch(() => null);
    if (decodeURIComponent(location.hash.slice(1)) !== hash) return;  // moved on meanwhile
    if (!SAEJAX.data.features.has(id)) throw new Error(`feature ${id} is not in this analysis`);
  }
  current = SAEJAX.data.features.get(id);
  render(current, meta);
  $("status").hidden = true;
}

function render(f, meta) {
  document.title = `Feature ${f.id} · ${meta.title}`;
  navLink($("prev"), f.prev);
  navLink($("next"), f.next);
  const dead = f.n_fired === 0;
  const parts = [
    el("h1", {}, `Feature ${f.id}`, dead ? el("span", { className: "badge dead" }, "dead") : null),
    explanation(f),
    el("div", { className: "cols" },
      el("section", {}, el("h2", {}, "Statistics"), stats(f)),
      el("section", {}, el("h2", {}, "Activations"), actHistogram(f, meta.hist_edges))),
    logits(f.logits),
    examples("top", "Top activations", f.top, f),
    examples("samples", "Random samples across the activation range", f.samples, f)];
  // replaceChildren would show a skipped (null) part as the text "null"
  $("feature").replaceChildren(...parts.filter((c) => c !== null && c !== undefined));
}

function navLink(a, id) {
  if (id === null || id === undefined) { a.removeAttribute("href"); a.className = "disabled"; return; }
  a.href = `#${id}`;
  a.className = "";
}

function explanation(f) {
  if (f.explanation === null || f.explanation === undefined) return null;
  return el("p", { className: "explanation", dir: "auto" }, f.explanation,
    isNum(f.score) ? el("span", { className: "badge", title: "explanation score" }, `score ${fmt(f.score)}`) : null);
}

function stats(f) {
  const table = el("table", { className: "kv", id: "stats" });
  fillKv(table, [["density", fmtDensity(f.density)], ["tokens fired on", f.n_fired],
    ["max activation", f.max_act], ["mean activation (when firing)", f.mean_act], ...f.extra]);
  if (f.missing) table.append(el("caption", {}, "The analysis has no examples file for this feature."));
  return table;
}

function actHistogram(f, edges) {
  const h = f.hist;
  if (!h || !h.counts.some((c) => c > 0) && !h.under && !h.over) {
    return el("p", { className: "empty" }, "No activations recorded.");
  }
  const range = (a, b) => `activation ${fmt(10 ** a)} to ${fmt(10 ** b)}`;
  const notes = [];
  if (h.under) notes.push(`${fmt(h.under)} below ${fmt(10 ** edges[0])}`);
  if (h.over) notes.push(`${fmt(h.over)} above ${fmt(10 ** edges[edges.length - 1])}`);
  return el("div", { id: "act-hist" },
    histogram(edges, h.counts, { label: "activation when firing (log scale)", range }),
    notes.length ? el("p", { className: "note" }, `Outside the axis: ${notes.join("; ")}.`) : null);
}

function logits(l) {
  if (!l) return null;
  const list = (id, title, pairs) => {
    const max = Math.max(1e-12, ...pairs.map((p) => Math.abs(p[1])));
    return el("div", { className: `logits ${id}` }, el("h3", {}, title), el("ol", { id },
      ...pairs.map(([tok, v]) => {
        const bar = el("span", { className: "bar" });
        bar.style.width = `${(100 * Math.abs(v)) / max}%`;
        return el("li", {}, el("span", { className: "tok", dir: "auto", title: JSON.stringify(tok) }, visible(tok)),
          el("span", { className: "barbox" }, bar), el("span", { className: "num" }, fmt(v)));
      })));
  };
  return el("section", { id: "logits" }, el("h2", {}, "Logit effects (direct, through the unembedding)"),
    el("div", { className: "cols" }, list("promoted", "Promoted", l.promoted || []),
      list("suppressed", "Suppressed", l.suppressed || [])));
}

function examples(id, title, list, f) {
  const section = el("section", { id, className: "examples" }, el("h2", {}, `${title} (${list.length})`));
  if (!list.length) {
    section.append(el("p", { className: "empty" }, f.n_fired ? "None recorded." : "None: this feature never fired."));
    return section;
  }
  // Shade relative to the feature's max activation, so weak samples look weak.
  const scale = f.max_act > 0 ? f.max_act : Math.max(...list.map((e) => e.act));
  section.append(...list.map((ex) => example(ex, scale)));
  return section;
}

/**
 * One example: its activation, then its tokens. Tokens are not bidi-isolated, so an Arabic or
 * Hebrew run reads right to left across token boundaries, its letters joined, as in the source
 * text; the line's own direction is that of most of its letters (see direction).
 */
function example(ex, scale) {
  const lo = Math.max(0, ex.focus - BEFORE), hi = Math.min(ex.tokens.length, ex.focus + AFTER + 1);
  const ctx = el("div", { className: "ctx", dir: direction(ex.tokens) });
  if (lo > 0) ctx.append(el("span", { className: "more" }, "… "));
  ex.tokens.forEach((t, i) => {
    const pos = isNum(ex.pos) ? ` · position ${ex.pos - ex.focus + i}` : "";
    const span = el("span", {
      className: `tok${i === ex.focus ? " focus" : ""}${i < lo || i >= hi ? " far" : ""}`,
      title: `${JSON.stringify(t)}\nactivation ${fmt(ex.acts[i])}${pos}`,
    }, visible(t));
    const a = scale > 0 ? Math.min(1, Math.max(0, ex.acts[i] / scale)) : 0;
    if (a > 0) span.style.backgroundColor = `rgba(255, 128, 0, ${a.toFixed(3)})`;
    ctx.append(span);
  });
  if (hi < ex.tokens.length) ctx.append(el("span", { className: "more" }, " …"));
  const row = el("div", { className: "ex" },
    el("div", { className: "act num", title: `context ${ex.context}, position ${ex.pos}` }, fmt(ex.act)), ctx);
  if (lo > 0 || hi < ex.tokens.length) ctx.onclick = () => row.classList.toggle("full");
  return row;
}

const RTL_LETTER = /[\p{Script=Arabic}\p{Script=Hebrew}\p{Script=Syriac}\p{Script=Thaana}\p{Script=Nko}\p{Script=Adlam}]/u;

/** "rtl" when most letters are in a right-to-left script. Not dir=auto (the first strong
 * letter): an example is a window cut from its context, often starting mid-sentence. */
function direction(tokens) {
  let rtl = 0, ltr = 0;
  for (const ch of tokens.join("")) {
    if (/\p{L}/u.test(ch)) RTL_LETTER.test(ch) ? rtl++ : ltr++;
  }
  return rtl > ltr ? "rtl" : "ltr";
}

/** Whitespace a reader can see: newlines and tabs as symbols (spaces stay, white-space: pre). */
function visible(tok) {
  return tok === "" ? "∅" : tok.replace(/\n/g, "⏎").replace(/\r/g, "␍").replace(/\t/g, "⇥");
}

function go(id) {
  if (id !== null && id !== undefined) location.hash = `#${id}`;
}

$("goto").addEventListener("submit", (e) => {
  e.preventDefault();
  go(e.target.elements.id.value.trim());
});
$("full").addEventListener("change", (e) => document.body.classList.toggle("full", e.target.checked));
document.addEventListener("keydown", (e) => {
  if (e.target.closest("input, textarea") || e.altKey || e.ctrlKey || e.metaKey) return;
  if (!current) return;
  if (e.key === "ArrowLeft") go(current.prev);
  if (e.key === "ArrowRight") go(current.next);
});
function failed(e) {
  current = null;
  $("feature").replaceChildren();
  showError(e);
}
window.addEventListener("hashchange", () => { window.scrollTo(0, 0); show().catch(failed); });
show().catch(failed);

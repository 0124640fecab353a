"""The evaluation half of the one-layer reproduction: the figures `README.md` reports.

    python experiments/monosemanticity_1l/run.py       # first: corpus -> LM -> SAEs
    python experiments/monosemanticity_1l/report.py    # then: this (stages resume)

Each stage is the `saejax` command named beside it, on the artifacts of `run.py` in --work:

    eval      saejax eval SAEs --tokens T --contexts=-8000: --out W/eval
    analyze   saejax analyze SAE --tokens T --contexts 12000:16000 --scripts arabic,cyrillic,cjk
              --autointerp offline --autointerp-n 200 --out W/analysis/<name>   (also the neurons)
    browse    saejax browse W/analysis/sae W/browse
    compare   saejax compare sae_512 sae_512_seed1 ... (cross-seed); sae_512 sae_512_lm_seed1
              --neurons (across two LMs, with the neuron baseline); sae_512 sae_1024 sae
              (the splitting tree)

Held-out text: the SAEs trained on activations of the first 12,000 contexts (run.py's harvest);
`eval` reads the last 8,000 contexts (1.01M tokens, enough to resolve density 1e-6, and the LM's
own validation contexts are the last 512 of them), `analyze` and `compare` read contexts
12,000-16,000. Numbers go to W/report.json; the figures the README embeds are copied into
experiments/monosemanticity_1l/figures/.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import time
from pathlib import Path

HERE = Path(__file__).parent
SITE = "blocks.0.mlp.hook_post"
SAES = ["sae_512", "sae_512_seed1", "sae_1024", "sae"]
ANALYZED = ["sae_512", "sae_1024", "sae", "neurons"]
CLASSES = "arabic,cyrillic,cjk"


def run_stage(report: dict, name: str, done: bool, fn) -> None:
    if done:
        print(f"[{name}] already done")
        return
    print(f"[{name}] running", flush=True)
    t0 = time.perf_counter()
    fn()
    report.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)


def cli(*argv: str) -> None:
    from saejax import cli as saejax_cli

    print("saejax", " ".join(argv), flush=True)
    rc = saejax_cli.main(list(argv))
    if rc:
        raise SystemExit(f"saejax {argv[0]} exited {rc}")


def top_token_labels(analysis_dir: Path) -> dict[int, str]:
    """{feature id: the token it most often peaks on among its top examples}, for figures."""
    from saejax.analysis.features import feature, load_analysis

    labels = {}
    for row in load_analysis(analysis_dir)["features"]:
        if row["n_fired"]:
            top = feature(analysis_dir, row["id"])["top"]
            focus = collections.Counter(ex["tokens"][ex["focus"]] for ex in top)
            labels[row["id"]] = repr(focus.most_common(1)[0][0])
    return labels


def summarize_analysis(analysis_dir: Path) -> dict:
    """Script-feature bests and auto-interpretability scores of one analysis directory."""
    import numpy as np

    scripts = json.loads((analysis_dir / "scripts" / "scripts.json").read_text())
    scores = [json.loads(p.read_text()).get("score")
              for p in (analysis_dir / "features").glob("*.json")]
    scores = np.array([s for s in scores if s is not None], float)
    return {"scripts": scripts, "autointerp": {
        "n": int(len(scores)), "mean": float(scores.mean()) if len(scores) else None,
        "median": float(np.median(scores)) if len(scores) else None}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="data/mono1l")
    p.add_argument("--eval-contexts", default="-8000:")
    p.add_argument("--analysis-contexts", default="12000:16000")
    p.add_argument("--autointerp-n", type=int, default=200)
    args = p.parse_args()
    from saejax.analysis.neurons import export_neuron_basis

    work = Path(args.work)
    tokens = str(work / "tokens")
    rep_file = work / "report.json"
    report = json.loads(rep_file.read_text()) if rep_file.exists() else {}
    runs = {name: str(work / name) for name in SAES}
    neurons = work / "neurons"
    if not neurons.exists():
        export_neuron_basis(work / "lm" / "hf", SITE, 512, neurons)
    runs["neurons"] = str(neurons)

    run_stage(report, "eval", (work / "eval" / "eval.json").exists(), lambda: cli(
        "eval", *[runs[n] for n in SAES], "--tokens", tokens,
        f"--contexts={args.eval_contexts}", "--out", str(work / "eval")))
    for name in ANALYZED:
        out = work / "analysis" / name
        run_stage(report, f"analyze_{name}", (out / "scripts" / "scripts.json").exists(),
                  lambda out=out, name=name: cli(
                      "analyze", runs[name], "--tokens", tokens, "--out", str(out),
                      "--contexts", args.analysis_contexts, "--scripts", CLASSES,
                      "--autointerp", "offline", "--autointerp-n", str(args.autointerp_n)))
        report.setdefault("analysis", {})[name] = summarize_analysis(out)
        rep_file.write_text(json.dumps(report, indent=1))
    run_stage(report, "browse", (work / "browse" / "index.html").exists(), lambda: cli(
        "browse", str(work / "analysis" / "sae"), str(work / "browse"),
        "--title", "one-layer model, 4,096 features"))
    arabic = report["analysis"]["sae"]["scripts"]["classes"]["arabic"]["feature"]["f1"][0]["id"]
    shot = work / "browse" / f"feature_{arabic}.png"
    run_stage(report, "screenshot", shot.exists(), lambda: screenshot(
        work / "browse", arabic, shot))
    run_stage(report, "compare_seeds", (work / "compare_seeds" / "compare.json").exists(),
              lambda: cli("compare", runs["sae_512"], runs["sae_512_seed1"], "--tokens", tokens,
                          "--contexts", args.analysis_contexts,
                          "--out", str(work / "compare_seeds")))
    run_stage(report, "compare_models", (work / "compare_models" / "compare.json").exists(),
              lambda: cli("compare", runs["sae_512"], str(work / "sae_512_lm_seed1"),
                          "--neurons", "--tokens", tokens, "--contexts", args.analysis_contexts,
                          "--out", str(work / "compare_models")))
    labels_file = work / "splitting_labels.json"
    if not labels_file.exists():
        labels_file.write_text(json.dumps({n: top_token_labels(work / "analysis" / n)
                                           for n in ("sae_512", "sae_1024", "sae")}))
    run_stage(report, "splitting", (work / "splitting" / "splitting.json").exists(),
              lambda: cli("compare", runs["sae_512"], runs["sae_1024"], runs["sae"],
                          "--tokens", tokens, "--contexts", args.analysis_contexts,
                          "--labels", str(labels_file), "--out", str(work / "splitting")))
    report["eval"] = json.loads((work / "eval" / "eval.json").read_text())
    report["compare_seeds"] = json.loads((work / "compare_seeds" / "compare.json").read_text())
    report["compare_models"] = json.loads((work / "compare_models" / "compare.json").read_text())
    report["splitting"] = json.loads((work / "splitting" / "splitting.json").read_text())
    rep_file.write_text(json.dumps(report, indent=1))
    copy_figures(work)
    (work / "report.md").write_text(table(report))
    print(table(report))


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(report: dict) -> str:
    """The README's comparison table, from report.json (markdown)."""
    ev = {r["name"]: r for r in report["eval"]["saes"]}
    an = report["analysis"]
    seeds = report["compare_seeds"]["features"]["correlation"]["a_to_b"]
    rows = [("loss recovered, zero ablation", "79% (A/1)", "loss_recovered_zero"),
            ("loss recovered, mean ablation", "-", "loss_recovered_mean"),
            ("L0 (mean features per token)", "healthy < 10-20", "l0"),
            ("FVU", "-", "fvu"), ("dead (never fires in 1.01M held-out tokens)", "4.1%",
                                  "dead_fraction"),
            ("ultralow density (< 1e-6)", "7.1%", "ultralow_fraction"),
            ("dense (> 1%)", "few", "dense_fraction")]
    lines = ["| measure | paper (A/1 unless noted) | 512 | 1,024 | 4,096 |",
             "| --- | --- | --- | --- | --- |"]
    for label, paper, key in rows:
        vals = [ev[n][key] for n in ("sae_512", "sae_1024", "sae")]
        fmt = (lambda v: f"{v:.2f}") if key in ("l0", "fvu") else _pct
        lines.append(f"| {label} | {paper} | " + " | ".join(fmt(v) for v in vals) + " |")
    def arabic(name, kind="feature", level=None):
        row = an[name]["scripts"]["classes"]["arabic"][kind]["f1"][0]
        if level is None:
            return row["precision"], row["id"]
        return next(lv["precision"] for lv in row["levels"] if lv["level"] == level), row["id"]
    for label, paper, level in [("best Arabic feature: precision (all activations)", "81%",
                                 None), ("best Arabic feature: precision, activation > 5",
                                         "98%", 5.0)]:
        cells = []
        for n in ("sae_512", "sae_1024", "sae"):
            p, i = arabic(n, level=level)
            cells.append(f"{_pct(p)} (#{i})")
        lines.append(f"| {label} | {paper} | " + " | ".join(cells) + " |")
    p, i = arabic("neurons", kind="feature")
    lines.append(f"| best Arabic neuron: precision | (neurons polysemantic) | "
                 f"{_pct(p)} (neuron {i}) | | |")
    ai = {n: an[n]["autointerp"]["mean"] for n in ("sae_512", "sae_1024", "sae", "neurons")}
    lines.append("| offline auto-interp score (mean Spearman, 200 units) | features beat neurons | "
                 + " | ".join(f"{ai[n]:.3f}" for n in ("sae_512", "sae_1024", "sae"))
                 + f" (neurons {ai['neurons']:.3f}) |")
    lines.append(f"| same LM, two SAE seeds: best-match correlation, median | - | "
                 f"{seeds['median']:.2f} | | |")
    models = report["compare_models"]
    feats, neurons = (models[k]["correlation"]["a_to_b"]["median"] for k in ("features", "neurons"))
    lines.append(f"| two LMs (seeds 0, 1): best-match correlation, median | 0.72 (neurons 0.46) | "
                 f"{feats:.2f} (neurons {neurons:.2f}) | | |")
    return "\n".join(lines) + "\n"


def screenshot(site: Path, feature_id: int, png: Path) -> None:
    """A picture of the browser's page for one feature, by headless Chromium (when installed)."""
    import subprocess

    chromium = shutil.which("chromium")
    if chromium is None:
        print("no chromium: no screenshot")
        return
    url = (site / "feature.html").resolve().as_uri() + f"#{feature_id}"
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--window-size=1280,1400", "--hide-scrollbars", "--virtual-time-budget=5000",
                    f"--screenshot={png}", url], check=True, capture_output=True)


def copy_figures(work: Path) -> None:
    """The PNGs the README embeds, into the repository (small files)."""
    figs = HERE / "figures"
    figs.mkdir(exist_ok=True)
    for src in [*(work / "eval").glob("*_density.png"), work / "splitting" / "splitting.png",
                *(work / "analysis" / "sae" / "scripts").glob("*.png"),
                *(work / "browse").glob("feature_*.png")]:
        shutil.copy(src, figs / src.name)


if __name__ == "__main__":
    main()

"""The feature browser (saejax.browse): the data writer, then the site in real headless Chromium.

The analysis directory is written by hand here in the format of saejax.analysis.features: a few
dozen features with Arabic tokens, a dead feature, and token strings that would run as HTML if
they were not escaped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import unicodedata
from pathlib import Path

import pytest

from saejax.browse.site import BUNDLE, CHUNK, compact, write_index, write_site

N_FEATURES = 40
DEAD = 7
ARABIC_FEATURE = 3
NO_FILE = 39  # listed in analysis.json, no features/39.json
EDGES = [-4 + i * 0.25 for i in range(33)]
SAE_NAME = "tiny <b>relu</b> & co"
# Would set the title and a global if a page ever parsed token strings as HTML.
PAYLOADS = ["<script>document.title='pwned';window.__pwned=1</script>",
            "<img src=x onerror=\"document.title='pwned';window.__pwned=1\">", " &amp;", " & "]
WORDS = [" the", " cat", " sat", " on", " mat", "\n", "  ", " مرحبا", " بالعالم", *PAYLOADS]
ARABIC = ["ال", "قط", "ة", " جلست", " على", " الحصيرة"]
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


def _example(rng, j, act, tokens=None):
    tokens = tokens or [rng.choice(WORDS) for _ in range(14)]
    focus = min(10, len(tokens) - 1)
    acts = [round(act * rng.random() * 0.6, 4) for _ in tokens]
    acts[focus] = act
    return {"context": rng.randrange(500), "pos": 40 + focus, "act": act, "tokens": tokens,
            "acts": acts, "focus": focus}


def make_analysis(path: Path, n: int = N_FEATURES) -> dict:
    """Write an analysis directory; returns analysis.json's content."""
    rng = random.Random(0)
    (path / "features").mkdir(parents=True)
    rows = []
    for j in range(n):
        dead = j == DEAD
        density = 0.0 if dead else round(10 ** rng.uniform(-3.5, -0.5), 6)  # distinct values
        max_act = 0.0 if dead else round(rng.uniform(1, 10), 3)
        row = {"id": j, "n_fired": 0 if dead else int(density * 100_000), "density": density,
               "max_act": max_act, "mean_act": round(max_act / 3, 3)}
        rows.append(row)
        if j == NO_FILE:
            continue
        if dead:
            top = samples = []
        elif j == ARABIC_FEATURE:
            top = [_example(rng, j, round(max_act * (1 - i / 10), 3), ARABIC * 2) for i in range(5)]
            samples = [_example(rng, j, round(max_act * rng.random(), 3), ARABIC) for _ in range(3)]
        else:
            top = [_example(rng, j, round(max_act * (1 - i / 10), 3)) for i in range(5)]
            # Mostly Arabic after a Latin first word: shown right to left all the same.
            top.append(_example(rng, j, round(max_act / 2, 3), [" cat", *ARABIC, *ARABIC]))
            samples = [_example(rng, j, round(max_act * rng.random(), 3)) for _ in range(4)]
        counts = [0] * 34 if dead else [rng.randrange(50) for _ in range(34)]  # under, bins, over
        feature = {**row, "top": top, "samples": samples, "hist": {"counts": counts},
                   "logits": {"promoted": [[PAYLOADS[0], 1.5], [" mat", 1.2], [" مرحبا", 0.7]],
                              "suppressed": [[" the", -0.9], [PAYLOADS[1], -0.4]]},
                   "explanation": f"cats <i>#{j}</i> & mats" if j % 3 == 0 else None,
                   "score": round(j / n, 3) if j % 3 == 0 else None,
                   "script": {"name": "Arabic", "precision": 0.9} if j == ARABIC_FEATURE else None}
        (path / "features" / f"{j}.json").write_text(json.dumps(feature, ensure_ascii=False),
                                                     encoding="utf-8")
    analysis = {"format": "saejax.analysis", "version": 1,
                "sae": {"name": SAE_NAME, "source": "runs/x", "site": "blocks.0.mlp.hook_post",
                        "lm_path": "runs/lm/hf", "n_features": n, "arch": "relu", "k": None},
                "tokens": {"path": "data/tokens", "contexts": "0:500", "n_tokens": 64_000},
                "top_k": 6, "n_samples": 4, "hist_edges": EDGES, "features": rows}
    (path / "analysis.json").write_text(json.dumps(analysis), encoding="utf-8")
    (path / "eval.json").write_text(json.dumps({"fvu": 0.12, "l0": 14.5, "splice": {"ce": 3.1}}))
    return analysis


def _call(path: Path) -> list:
    """The arguments of a data file's SAEJAX.fn(...) call, parsed back as JSON."""
    text = path.read_text(encoding="utf-8")
    return json.loads("[" + text[text.index("(") + 1:text.rindex(")")] + "]")


def _feature(site: Path, j: int) -> dict:
    """Feature j from its bundle file."""
    [f] = [f for f in _call(site / f"data/features/{j // BUNDLE}.js")[0] if f["id"] == j]
    return f


# -- the data writer (no browser) -----------------------------------------------------------------

def test_write_site_files_and_escaping(tmp_path):
    analysis = make_analysis(tmp_path / "a")
    index = write_site(tmp_path / "a", tmp_path / "site")
    site = tmp_path / "site"
    assert index == site / "index.html"
    for name in ["feature.html", "static/common.js", "static/browse.css", "data/meta.js",
                 "data/index/0.js", *(f"data/features/{b}.js" for b in range(3))]:
        assert (site / name).is_file(), name
    page = index.read_text(encoding="utf-8")
    assert "<title>tiny &lt;b&gt;relu&lt;/b&gt; &amp; co · saejax features</title>" in page
    assert "<b>" not in page and "{{" not in page
    # Token strings are JSON data inside .js files (never HTML), and come back unchanged.
    assert len(list((site / "data/features").iterdir())) == 3  # 40 features in bundles of 16
    f = _feature(site, 0)
    assert [ex["tokens"] for ex in f["top"]] == [
        ex["tokens"] for ex in json.loads((tmp_path / "a/features/0.json").read_text())["top"]]
    assert f["prev"] is None and f["next"] == 1
    assert f["hist"]["under"] == json.loads((tmp_path / "a/features/0.json").read_text())[
        "hist"]["counts"][0] and len(f["hist"]["counts"]) == 32
    assert _feature(site, 3)["extra"] == [["script.name", "Arabic"],
                                                              ["script.precision", 0.9]]
    missing = _feature(site, NO_FILE)
    assert missing["missing"] and missing["top"] == [] and missing["next"] is None
    i, cols = _call(site / "data/index/0.js")
    assert i == 0 and cols["id"] == list(range(N_FEATURES))
    assert cols["explanation"][3] == "cats <i>#3</i> & mats" and cols["score"][1] is None
    meta = _call(site / "data/meta.js")[0]
    assert meta["n_dead"] == 1 and meta["chunks"] == ["data/index/0.js"]
    assert ["splice.ce", 3.1] in meta["eval"]
    assert cols["density"][5] == pytest.approx(analysis["features"][5]["density"], rel=1e-3)
    # A second write replaces the data; a directory that is not a site is refused.
    write_site(tmp_path / "a", site)
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other"):
        write_site(tmp_path / "a", tmp_path / "other")


def test_bad_analysis_names_file_and_field(tmp_path):
    make_analysis(tmp_path / "a")
    bad = tmp_path / "a/features/5.json"
    f = json.loads(bad.read_text())
    f["top"][2]["acts"].pop()
    bad.write_text(json.dumps(f))
    with pytest.raises(ValueError, match=r"features/5\.json: top\[2\]\.acts has 13 values"):
        write_site(tmp_path / "a", tmp_path / "site")
    f["top"] = []
    f["hist"]["counts"] = [1, 2, 3]
    bad.write_text(json.dumps(f))
    with pytest.raises(ValueError, match=r"5\.json: field 'hist\.counts' has 3 counts"):
        write_site(tmp_path / "a", tmp_path / "site")
    a = json.loads((tmp_path / "a/analysis.json").read_text())
    a["version"] = 2
    (tmp_path / "a/analysis.json").write_text(json.dumps(a))
    with pytest.raises(ValueError, match=r"analysis\.json: format 'saejax\.analysis' version 2"):
        write_site(tmp_path / "a", tmp_path / "site")


def test_index_of_100k_features_stays_chunked(tmp_path):
    n = 100_000
    rows = [{"id": j, "n_fired": j % 50, "density": (j % 50) / 1e5 + 1.2345678e-7,
             "max_act": 3.14159265 * (j % 7), "mean_act": 1.0 / (1 + j % 11),
             "score": None if j % 2 else 0.5, "explanation": "a number feature" if j % 5 else None}
            for j in range(n)]
    names = write_index(rows, tmp_path)
    files = sorted((tmp_path / "index").iterdir(), key=lambda p: int(p.stem))
    assert len(names) == len(files) == -(-n // CHUNK)
    assert max(p.stat().st_size for p in files) < 1_000_000, "an index chunk is over 1 MB"
    i, cols = _call(files[-1])
    assert i == len(files) - 1 and cols["id"][-1] == n - 1 and len(cols["id"]) == CHUNK
    assert cols["max_act"][1] == pytest.approx(3.14159265 * ((n - CHUNK + 1) % 7), rel=1e-3)


# -- the site in headless Chromium ----------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """Debian's chromium through chromedriver. Missing pieces skip the tests outside CI and fail
    them in CI (.ci/run sets CI and installs chromium and chromium-driver)."""
    need = ("the feature-browser tests need Debian's chromium and chromium-driver: apt-get install "
            "chromium chromium-driver (.ci/run installs them and fails without them)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "the feature-browser tests need selenium: pip install -e '.[test]'")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        (pytest.fail if os.environ.get("CI") else pytest.skip)(need)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--force-device-scale-factor=1", "--lang=en-US"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    yield d
    d.quit()


def _wait(d, condition, what: str, timeout: float = 5.0):
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = condition()
        except StaleElementReferenceException:  # replaced while being read: read again
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; page errors: {_errors(d)}")


def _errors(d) -> list[str]:
    return [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]


def _h1(d) -> str:
    """The page heading, read in one step (the page replaces it as it navigates)."""
    return d.execute_script("return document.querySelector('h1')?.textContent || ''")


def _column(d, n: int) -> list[str]:
    return d.execute_script(f"return [...document.querySelectorAll('#features tbody tr')]"
                            f".map(r => r.cells[{n}].textContent)")


def _alpha(css_color: str) -> float:
    """The opacity of an orange token background; 0 for none (transparent)."""
    if css_color == "rgba(0, 0, 0, 0)":
        return 0.0
    m = re.fullmatch(r"rgba?\(255, 128, 0(?:, ([\d.]+))?\)", css_color)
    assert m, f"not the activation colour: {css_color}"
    return float(m.group(1) or 1)


def _letters(tokens) -> int:
    return sum(ch.isalpha() for ch in "".join(tokens))


def _rtl_letters(tokens) -> int:
    return sum(ch.isalpha() and unicodedata.bidirectional(ch) in ("R", "AL")
               for ch in "".join(tokens))


def test_site_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    analysis = make_analysis(tmp_path / "a")
    index = write_site(tmp_path / "a", tmp_path / "site")
    title = f"{SAE_NAME} · saejax features"
    ARTIFACTS.mkdir(exist_ok=True)

    # Index: summary, histogram, all rows (one page), sort by density, filter, hide dead.
    d.get(index.as_uri())
    _wait(d, lambda: len(_column(d, 0)) == N_FEATURES, "the feature table")
    assert d.title == title
    summary = d.find_element(By.ID, "summary").text
    assert "blocks.0.mlp.hook_post" in summary and "64,000" in summary
    assert d.find_elements(By.CSS_SELECTOR, "#density svg rect")
    assert "fvu" in d.find_element(By.ID, "eval-table").text
    d.find_element(By.CSS_SELECTOR, "th[data-key=density] button").click()
    # Data files hold 4 significant digits; ties keep table (id) order.
    by_density = sorted(analysis["features"], key=lambda r: (-compact(r["density"]), r["id"]))
    _wait(d, lambda: _column(d, 0) == [str(r["id"]) for r in by_density], "density order")
    assert "sort=density&desc=1" in d.current_url
    d.find_element(By.CSS_SELECTOR, "th[data-key=density] button").click()
    _wait(d, lambda: _column(d, 0)[0] == str(DEAD), "ascending density (dead first)")
    d.find_element(By.ID, "hide-dead").click()
    _wait(d, lambda: len(_column(d, 0)) == N_FEATURES - 1, "dead features hidden")
    assert str(DEAD) not in _column(d, 0)
    d.find_element(By.ID, "filter").send_keys("<i>#1")  # explanation text, HTML-special
    _wait(d, lambda: sorted(_column(d, 0)) == ["12", "15", "18"], "the explanation filter")
    d.find_element(By.ID, "filter").clear()
    d.find_element(By.ID, "filter").send_keys("9")  # an id
    _wait(d, lambda: _column(d, 0) == ["9"], "the id filter")
    d.find_element(By.ID, "filter").clear()
    d.find_element(By.ID, "filter").send_keys(" ")
    _wait(d, lambda: len(_column(d, 0)) == N_FEATURES - 1, "the filter cleared")
    d.save_screenshot(str(ARTIFACTS / "browse_index.png"))

    # Feature page, reached by its link in the table.
    d.find_element(By.CSS_SELECTOR, "#features tbody a[href='feature.html#12']").click()
    _wait(d, lambda: len(d.find_elements(By.CSS_SELECTOR, "#top .ex")) == 6, "top examples")
    assert d.title == f"Feature 12 · {title}"
    f12 = json.loads((tmp_path / "a/features/12.json").read_text(encoding="utf-8"))
    assert _h1(d) == "Feature 12"
    assert d.find_element(By.CLASS_NAME, "explanation").text.startswith("cats <i>#12</i> & mats")
    assert len(d.find_elements(By.CSS_SELECTOR, "#samples .ex")) == 4
    assert len(d.find_elements(By.CSS_SELECTOR, "#top .tok.focus")) == 6
    # Every token is shown, shaded by act / max_act, its activation in its tooltip.
    first = f12["top"][0]
    toks = d.execute_script("return [...document.querySelectorAll('#top .ex')[0]"
                            ".querySelectorAll('.tok')].map(t => [t.textContent, t.title, "
                            "getComputedStyle(t).backgroundColor])")
    assert len(toks) == len(first["tokens"])
    for (text, tip, bg), tok, act in zip(toks, first["tokens"], first["acts"]):
        assert text == tok.replace("\n", "⏎")
        assert float(tip.split("activation ")[1].split()[0]) == pytest.approx(act, rel=1e-3)
        assert _alpha(bg) == pytest.approx(act / f12["max_act"], abs=5e-3), (tok, bg)  # 8-bit alpha
    assert toks[first["focus"]][2] == "rgb(255, 128, 0)"  # the focus is at the feature's max act
    # HTML in tokens is text: present verbatim, never executed.
    shown = d.execute_script("return [...document.querySelectorAll('.tok')]"
                             ".map(t => t.textContent)")
    assert PAYLOADS[0] in shown and PAYLOADS[1] in shown
    assert d.execute_script("return window.__pwned") is None
    assert not d.find_elements(By.CSS_SELECTOR, "#feature img, #feature script, #feature i")
    # Each line runs in the direction of most of its letters (Arabic tokens mixed in here).
    want = ["rtl" if _rtl_letters(ex["tokens"]) * 2 > _letters(ex["tokens"]) else "ltr"
            for ex in f12["top"]]
    assert "rtl" in want and "ltr" in want, "the fixture should hold lines of both directions"
    assert d.execute_script("return [...document.querySelectorAll('#top .ctx')]"
                            ".map(c => c.matches(':dir(rtl)') ? 'rtl' : 'ltr')") == want
    # Statistics, histogram, logit effects.
    assert "1 in" in d.find_element(By.ID, "stats").text
    assert len(d.find_elements(By.CSS_SELECTOR, "#act-hist rect")) == 32
    promoted = [e.get_attribute("textContent")
                for e in d.find_elements(By.CSS_SELECTOR, "#promoted li .tok")]
    assert promoted == [PAYLOADS[0], " mat", " مرحبا"]
    assert len(d.find_elements(By.CSS_SELECTOR, "#suppressed li")) == 2
    ARTIFACTS.mkdir(exist_ok=True)
    d.set_window_size(1280, 1500)
    d.save_screenshot(str(ARTIFACTS / "browse_feature.png"))
    d.set_window_size(1280, 1000)

    # Next / previous (links, then arrow keys), and the way back to the index.
    d.find_element(By.ID, "next").click()
    _wait(d, lambda: _h1(d) == "Feature 13", "next feature")
    d.find_element(By.ID, "prev").click()
    _wait(d, lambda: _h1(d) == "Feature 12", "previous feature")
    ActionChains(d).send_keys(Keys.ARROW_RIGHT).perform()
    _wait(d, lambda: _h1(d) == "Feature 13", "arrow key")

    # Arabic examples render right to left; the dead and file-less features say so.
    d.get(f"{(tmp_path / 'site/feature.html').as_uri()}#{ARABIC_FEATURE}")
    _wait(d, lambda: _h1(d) == f"Feature {ARABIC_FEATURE}", "the Arabic feature")
    assert d.execute_script("return [...document.querySelectorAll('#top .ctx')]"
                            ".every(c => c.matches(':dir(rtl)'))")
    assert "script.precision" in d.find_element(By.ID, "stats").text
    d.execute_script(f"location.hash = '#{DEAD}'")
    _wait(d, lambda: _h1(d).startswith(f"Feature {DEAD}"), "dead")
    assert "never fired" in d.find_element(By.ID, "top").text
    assert "null" not in d.find_element(By.ID, "feature").text  # no explanation: nothing shown
    d.execute_script(f"location.hash = '#{NO_FILE}'")
    _wait(d, lambda: "no examples file" in d.find_element(By.ID, "stats").text, "file-less")
    assert d.find_element(By.ID, "next").get_attribute("href") is None  # the last feature
    d.execute_script("location.hash = '#4000'")
    _wait(d, lambda: "feature 4000 is not in this analysis" in d.find_element(By.ID, "status").text,
          "the missing-feature message")
    d.find_element(By.ID, "to-index").click()
    _wait(d, lambda: len(_column(d, 0)) == N_FEATURES, "the index again")
    assert d.execute_script("return window.__pwned") is None
    missing = (f"features/{4000 // BUNDLE}.js", "feature 4000")  # asked for on purpose
    errors = [e for e in _errors(d) if not any(m in e for m in missing)]
    assert not errors, errors


def test_index_paginates_in_chromium(browser, tmp_path):
    """250 features (no per-feature files): 100 rows a page, the pager moves through them, and
    the page number survives in the URL."""
    from selenium.webdriver.common.by import By

    d = browser
    (tmp_path / "a").mkdir()
    rows = [{"id": j, "n_fired": 1, "density": 1e-4, "max_act": 1.0, "mean_act": 0.5}
            for j in range(250)]
    (tmp_path / "a/analysis.json").write_text(json.dumps(
        {"format": "saejax.analysis", "version": 1, "sae": {"name": "pages"}, "tokens": {},
         "top_k": 0, "n_samples": 0, "hist_edges": EDGES, "features": rows}))
    index = write_site(tmp_path / "a", tmp_path / "site")
    d.get(index.as_uri())
    _wait(d, lambda: len(_column(d, 0)) == 100, "the first page")
    assert _column(d, 0)[0] == "0" and "page 1 of 3" in d.find_element(By.ID, "pager").text
    d.find_element(By.CSS_SELECTOR, "#pager button[title='next page']").click()
    _wait(d, lambda: _column(d, 0)[:1] == ["100"], "the second page")
    d.find_element(By.CSS_SELECTOR, "#pager button[title='last page']").click()
    _wait(d, lambda: _column(d, 0) == [str(j) for j in range(200, 250)], "the last page")
    assert "page=3" in d.current_url
    d.refresh()
    _wait(d, lambda: _column(d, 0)[:1] == ["200"], "the last page after a reload")
    assert not _errors(d)

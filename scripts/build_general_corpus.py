"""Build `msopt/assets/general.json.xz`: general English prose, disjoint from Shakespeare, for pretraining.

    python scripts/build_general_corpus.py                  # downloads the Debian package with apt-get download
    python scripts/build_general_corpus.py --deb r-cran-janeaustenr_1.0.0-1_all.deb

Sources:
- Jane Austen's six completed novels (Emma, Mansfield Park, Northanger Abbey, Persuasion, Pride and Prejudice, Sense
  and Sensibility) from the Debian package `r-cran-janeaustenr` (1.0.0-1, the CRAN package janeaustenr by Julia
  Silge, MIT; the novels themselves are public domain). Its texts are the Project Gutenberg UTF-8 plain texts with the
  Gutenberg headers and license removed, one character vector of lines per novel. The package stores them as an R
  lazy-load database (`data/Rdata.rdx`, a gzip-compressed serialized index of name -> (offset, length), and
  `data/Rdata.rdb`, where each object is a 4-byte big-endian length followed by a zlib-compressed serialization);
  `read_lazyload` below reads it with the PyPI package `rdata`.
- The English side (World English Bible, public domain) of the bundled `msopt/assets/bible_en_es.tsv.xz` (made by
  `scripts/build_bible.py`): one work per book, its verses in order, one verse per line. 3 John is absent there (its
  single chapter is numbered differently in the two versifications), so there are 65 books.

The texts are kept as they are (the Austen lines joined with newlines; cleaning is `msopt.data.clean_text` at load
time). Work ids are `austen_<novel>` and `bible_<NN>_<book>` (NN the canonical position, so that sorting by id keeps
the Bible's order); works are sorted by id. Genre: `novel` for Austen, `scripture` for the Bible books.

To rebuild (needs neither the Debian package installed nor R; `rdata` only for this script, not for msopt):

    pip install rdata
    python scripts/build_general_corpus.py

The build is deterministic: rebuilding gives the same file byte for byte.
"""
import argparse
import gzip
import json
import lzma
import re
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import rdata

PACKAGE = "r-cran-janeaustenr"
DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
ASSETS = Path(__file__).resolve().parent.parent / "msopt" / "assets"

# R object name -> (work id, title, Project Gutenberg ebook number), as the janeaustenr help pages give them
NOVELS = {
    "emma": ("austen_emma", "Emma", 158),
    "mansfieldpark": ("austen_mansfield_park", "Mansfield Park", 141),
    "northangerabbey": ("austen_northanger_abbey", "Northanger Abbey", 121),
    "persuasion": ("austen_persuasion", "Persuasion", 105),
    "prideprejudice": ("austen_pride_and_prejudice", "Pride and Prejudice", 1342),
    "sensesensibility": ("austen_sense_and_sensibility", "Sense and Sensibility", 161),
}
WEB_URL = "https://packages.debian.org/bookworm/sword-text-web"


def download_deb(dest: Path) -> Path:
    "Download the Debian package `PACKAGE` into `dest` with apt-get download (no install) and return its path."
    subprocess.run(["apt-get", "download", PACKAGE], cwd=dest, check=True)
    return next(dest.glob(f"{PACKAGE}_*.deb"))


def read_lazyload(stem: Path) -> dict:
    "The objects of the R lazy-load database `stem`.rdx / `stem`.rdb, by name, converted to Python by `rdata`."
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(stem.with_suffix(".rdx").read_bytes())))
    if not bool(index["compressed"][0]):
        raise SystemExit(f"{stem}.rdb is not zlib-compressed; this script reads only that kind")
    rdb = stem.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        block = rdb[offset: offset + length]
        raw = zlib.decompress(block[4:])
        if len(raw) != struct.unpack(">I", block[:4])[0]:
            raise SystemExit(f"{stem}.rdb: object {name!r} decompresses to an unexpected length")
        objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return objects


def austen_works(deb: Path) -> list[dict]:
    "The six novels of the janeaustenr package in `deb` as works (id, title, genre, url, text)."
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        objects = read_lazyload(Path(tmp) / DATA)
    if sorted(objects) != sorted(NOVELS):
        raise SystemExit(f"the package's data objects differ from the novel table: {sorted(objects)}")
    return [{"id": wid, "title": title, "genre": "novel", "url": f"https://www.gutenberg.org/ebooks/{number}",
             "text": "\n".join(str(line) for line in objects[name])}
            for name, (wid, title, number) in NOVELS.items()]


def bible_works(tsv: Path) -> list[dict]:
    "One work per book of the English side of the bundled Bible TSV (columns ref, book, en, es), one verse a line."
    books: dict[str, list[str]] = {}                                  # book -> verses, in the file's (canonical) order
    lines = lzma.decompress(tsv.read_bytes()).decode("utf-8").splitlines()
    if lines[0] != "ref\tbook\ten\tes":
        raise SystemExit(f"{tsv.name}: unexpected header {lines[0]!r}")
    for line in lines[1:]:
        _, book, en, _ = line.split("\t")
        books.setdefault(book, []).append(en)
    return [{"id": f"bible_{i:02d}_" + re.sub(r"\W+", "_", book.lower()).strip("_"), "title": book,
             "genre": "scripture", "url": WEB_URL, "text": "\n".join(verses)}
            for i, (book, verses) in enumerate(books.items(), start=1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb", type=Path, help=f"a local {PACKAGE}_*.deb (default: download it with apt-get)")
    ap.add_argument("--out", type=Path, default=ASSETS, help="the assets folder to read the Bible from and write into")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        works = austen_works(args.deb or download_deb(Path(tmp))) + bible_works(args.out / "bible_en_es.tsv.xz")
    works.sort(key=lambda w: w["id"])
    corpus = {
        "source": "Debian r-cran-janeaustenr 1.0.0-1 (https://cran.r-project.org/package=janeaustenr); "
                  "World English Bible from msopt/assets/bible_en_es.tsv.xz (Debian sword-text-web)",
        "license": "public domain (Jane Austen's novels, the World English Bible); "
                   "janeaustenr packaging MIT, Copyright 2016-2017 Julia Silge",
        "provenance": ("Jane Austen's six completed novels as packaged by janeaustenr (Project Gutenberg UTF-8 "
                       "texts without Gutenberg headers), read from the package's R lazy-load data with rdata, lines "
                       "joined with newlines; the 65 books of the World English Bible's English side of "
                       "msopt/assets/bible_en_es.tsv.xz, one verse a line; texts kept as they are; "
                       "built by scripts/build_general_corpus.py"),
        "works": works,
    }
    path = args.out / "general.json.xz"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(lzma.compress(json.dumps(corpus, ensure_ascii=False).encode("utf-8"),
                                  preset=9 | lzma.PRESET_EXTREME))
    tmp.replace(path)
    counts = {g: sum(w["genre"] == g for w in works) for g in ("novel", "scripture")}
    print(f"wrote {path.name}: {len(works)} works {counts}, "
          f"{sum(len(w['text']) for w in works):,} characters, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()

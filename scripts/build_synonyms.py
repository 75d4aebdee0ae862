"""Build `msopt/assets/synonyms.json.xz`: a small English synonym table for the words of the bundled corpus.

    python scripts/build_synonyms.py                          # WordNet from /usr/share/wordnet (Debian wordnet-base)
    python scripts/build_synonyms.py --wordnet path/to/dict   # any WordNet 3.0 'dict' directory

**Source.** Princeton WordNet 3.0, read from its plain data files (`index.noun`, `index.verb`, `index.adj`,
`index.adv` and the matching `data.*`), as shipped by the Debian package `wordnet-base`. For every lower-case word of
the bundled Shakespeare corpus that occurs at least `--min-count` times, is not a stop word and is a WordNet lemma, the
table lists the single-word lemmas of its `--senses` most frequent senses per part of speech (WordNet orders senses by
frequency), at most `--max-synonyms` of them, in that order. Multi-word lemmas and the word itself are left out.
`msopt.augment.synonyms_from_wordnet` applies the same rule to a whole WordNet directory.

**License.** WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. Permission to use, copy,
modify and distribute this software and database and its documentation for any purpose and without fee or royalty is
granted, provided that the copyright notice and statements, including the disclaimer, appear on all copies. THIS
SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
IMPLIED. The full license is https://wordnet.princeton.edu/license-and-commercial-use and is stored in the asset's
`license` field.

The build is deterministic: the same WordNet and corpus give the same file byte for byte.
"""
import argparse
import json
import lzma
import re
from collections import Counter
from pathlib import Path

from msopt.augment import STOPWORDS, synonyms_from_wordnet
from msopt.data import load_corpus

LICENSE = (
    "WordNet Release 3.0. This software and database is being provided to you, the LICENSEE, by Princeton University "
    "under the following license. By obtaining, using and/or copying this software and database, you agree that you "
    "have read, understood, and will comply with these terms and conditions.: Permission to use, copy, modify and "
    "distribute this software and database and its documentation for any purpose and without fee or royalty is hereby "
    "granted, provided that you agree to comply with the following copyright notice and statements, including the "
    "disclaimer, and that the same appear on ALL copies of the software, database and documentation, including "
    "modifications that you make for internal use or for distribution. WordNet 3.0 Copyright 2006 by Princeton "
    "University. All rights reserved. THIS SOFTWARE AND DATABASE IS PROVIDED \"AS IS\" AND PRINCETON UNIVERSITY MAKES "
    "NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON UNIVERSITY "
    "MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT- ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE "
    "OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, "
    "TRADEMARKS OR OTHER RIGHTS. The name of Princeton University or Princeton may not be used in advertising or "
    "publicity pertaining to distribution of the software and/or database. Title to copyright in this software, "
    "database and any associated documentation shall at all times remain with Princeton University and LICENSEE "
    "agrees to preserve same.")


def corpus_words(min_count: int) -> list[str]:
    "Lower-case alphabetic words of the bundled corpus seen at least `min_count` times, minus stop words."
    counts = Counter(w for d in load_corpus("shakespeare") for w in re.findall(r"[a-z]+", d.text.lower()))
    return sorted(w for w, c in counts.items() if c >= min_count and len(w) > 2 and w not in STOPWORDS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet", default="/usr/share/wordnet", help="a WordNet 3.0 dict directory")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "msopt/assets/synonyms.json.xz"))
    ap.add_argument("--min-count", type=int, default=3)
    ap.add_argument("--senses", type=int, default=2)
    ap.add_argument("--max-synonyms", type=int, default=6)
    args = ap.parse_args()
    words = corpus_words(args.min_count)
    table = synonyms_from_wordnet(args.wordnet, words=words, senses=args.senses, max_synonyms=args.max_synonyms)
    asset = {"source": "Princeton WordNet 3.0 (Debian package wordnet-base), https://wordnet.princeton.edu",
             "license": LICENSE,
             "provenance": f"scripts/build_synonyms.py --min-count {args.min_count} --senses {args.senses} "
                           f"--max-synonyms {args.max_synonyms}: single-word lemmas of the most frequent senses of "
                           "the words of the bundled Shakespeare corpus",
             "synonyms": table}
    data = json.dumps(asset, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    Path(args.out).write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    n = sum(map(len, table.values()))
    print(f"{len(table)} words with {n} synonyms ({len(words)} corpus words looked up) -> {Path(args.out).name}, "
          f"{Path(args.out).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

"""WikiText detokenization as in fairseq's Megatron-11b example, and Megatron's "original" token count.

    python -m m11b_jax.detok wiki.test.raw > wiki.test.detok
    python -m m11b_jax.detok wiki.test.raw --output wiki.test.detok   # written all-or-nothing

Per line: strip, split on single spaces, Moses-detokenize (sacremoses, English), then undo
WikiText's spacing in this order: " @" -> "", "@ " -> "", " =" -> "=", "= " -> "=",
" – " -> "–" (en dash). Every input line gives one output line (empty lines stay empty; the BPE
step drops them).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Sequence

from .errors import cli_main
from .textio import atomic_output, iter_lines

_WIKITEXT_FIXES = ((" @", ""), ("@ ", ""), (" =", "="), ("= ", "="), (" \u2013 ", "\u2013"))


@functools.cache
def _moses():
    import sacremoses

    return sacremoses.MosesDetokenizer(lang="en")


def detokenize_line(line: str) -> str:
    """One WikiText line, detokenized with the megatron_11b rules."""
    text = _moses().detokenize(line.strip().split(" "))
    for old, new in _WIKITEXT_FIXES:
        text = text.replace(old, new)
    return text


def original_token_count(path: str | os.PathLike) -> int:
    """Megatron's word count of `wiki.test.tokens`: len(text.strip().split(" ")) over the whole file.

    This is the denominator of the normalized perplexity 2^(log2(ppl) * bpe_tokens / count).
    """
    with open(path, encoding="utf-8") as f:
        return len(f.read().strip().split(" "))


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m m11b_jax.detok", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", default=["-"], help="input files, read in order ('-' or none = stdin)")
    p.add_argument("--output", "-o", default="-", help="output file (default stdout), renamed into place when done")
    args = p.parse_args(argv)
    if args.output == "-":
        sys.stdout.reconfigure(encoding="utf-8", newline="\n")
    with atomic_output(args.output) as out:
        for path in args.files:
            for line in iter_lines(path):
                out.write(detokenize_line(line) + "\n")


if __name__ == "__main__":
    main()

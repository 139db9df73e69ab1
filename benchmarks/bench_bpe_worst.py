"""The BPE worst case: one single-word line of 10 KB, 100 KB and 1 MB (issue 14, item 9).

    .venv/bin/python benchmarks/bench_bpe_worst.py [--data-dir ../shared/data]

The line is random lowercase letters ending in U+0378, a code point this Python's Unicode tables leave
unassigned, which sends the text to the pure-Python engine (as such text does in `python -m m11b_jax.bpe`).
Prints the seconds for each size and the ratio t(1 MB) / t(100 KB): about 10 for the O(n log n) merge loop
(100 for a quadratic one). Target: the 1 MB line in seconds (it did not finish in 300 s before).
"""

from __future__ import annotations

import argparse
import pathlib
import random
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from m11b_jax.tokenizer import GPT2BPE  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = p.parse_args()
    d = pathlib.Path(args.data_dir) / "gpt2_bpe"
    bpe = GPT2BPE.from_files(d / "encoder.json", d / "vocab.bpe")
    rng = random.Random(0)
    times = {}
    for size in (10_000, 100_000, 1_000_000):
        line = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(size - 2)) + "\u0378"
        bpe._cache.clear()
        start = time.perf_counter()
        ids = bpe.encode(line)
        times[size] = time.perf_counter() - start
        print(f"{size / 1e6:.2f} MB single-word line: {len(ids)} tokens in {times[size]:.2f} s")
    print(f"ratio t(1 MB) / t(100 KB) = {times[1_000_000] / times[100_000]:.1f} (O(n log n): ~10; quadratic: ~100)")


if __name__ == "__main__":
    main()

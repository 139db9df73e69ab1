"""Encoding wiki.test.raw: our GPT2BPE against tiktoken's GPT-2 encoding built from the same local files.

    .venv/bin/python benchmarks/bench_bpe.py [--data-dir ../shared/data] [--repeats 15]

Both encode the whole file as one string; the ids must be identical. Prints the best time of
`--repeats` interleaved runs of each, and the ratio ours / tiktoken (target: <= 1.5). Also
times our pure-Python engine (first call with an empty cache, then warm) for reference.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import tiktoken  # noqa: E402

from m11b_jax.tokenizer import GPT2_PATTERN, GPT2BPE, bytes_to_unicode  # noqa: E402


def tiktoken_from_files(encoder_json: pathlib.Path) -> tiktoken.Encoding:
    """tiktoken's GPT-2 recipe on local files: mergeable ranks = encoder.json ids of the tokens' bytes."""
    byte_of_char = {c: b for b, c in bytes_to_unicode().items()}
    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    ranks = {bytes(byte_of_char[c] for c in tok): i for tok, i in encoder.items() if tok != "<|endoftext|>"}
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    data = pathlib.Path(args.data_dir)
    text = (data / "wikitext-103" / "wiki.test.raw").read_text(encoding="utf-8")
    ours = GPT2BPE.from_files(data / "gpt2_bpe" / "encoder.json", data / "gpt2_bpe" / "vocab.bpe")
    reference = tiktoken_from_files(data / "gpt2_bpe" / "encoder.json")

    ours_s = tik_s = float("inf")
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        t, ids = best_of(lambda: ours.encode(text), 1)
        ours_s = min(ours_s, t)
        t, ref_ids = best_of(lambda: reference.encode_ordinary(text), 1)
        tik_s = min(tik_s, t)
    assert ids == ref_ids, "ids differ from tiktoken"

    cold = GPT2BPE.from_files(data / "gpt2_bpe" / "encoder.json", data / "gpt2_bpe" / "vocab.bpe", engine="python")
    cold_s, py_ids = best_of(lambda: cold.encode(text), 1)
    warm_s, py_ids = best_of(lambda: cold.encode(text), args.repeats)
    assert py_ids == ref_ids, "pure-Python ids differ from tiktoken"

    mb = len(text.encode("utf-8")) / 1e6
    print(f"wiki.test.raw: {mb:.2f} MB, {len(ids)} tokens, ids identical to tiktoken")
    print(
        f"ours (engine={ours.engine}): {ours_s:.4f} s   tiktoken: {tik_s:.4f} s   "
        f"ratio ours/tiktoken: {ours_s / tik_s:.2f}"
    )
    print(f"ours (engine=python): first call {cold_s:.3f} s, cached {warm_s:.3f} s ({warm_s / tik_s:.2f}x tiktoken)")


if __name__ == "__main__":
    main()

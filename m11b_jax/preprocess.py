"""`python -m m11b_jax.preprocess`: binarize language-model text into a fairseq data-bin.

    python -m m11b_jax.preprocess --only-source --srcdict gpt2_bpe/dict.txt \\
        --trainpref wiki.train.bpe --validpref wiki.valid.bpe --testpref wiki.test.bpe \\
        --destdir data-bin/wikitext-103 [--workers N]

Like `fairseq-preprocess --only-source --dataset-impl mmap`: each line of the input becomes one
sequence (its whitespace-separated words looked up in the dictionary, unknown -> <unk>, plus
</s>), written as DESTDIR/{train,valid,test}.{bin,idx} (a comma-separated --validpref gives
valid, valid1, ...), and the dictionary is saved as DESTDIR/dict.txt. The files match fairseq's
byte for byte; they appear together, and only when every split is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from typing import Sequence

from . import fsutil
from .dictionary import SPECIALS, UNK, Dictionary
from .errors import UserError, cli_main
from .indexed_dataset import MMapIndexedDatasetBuilder, dtype_for_vocab
from .textio import iter_lines, line_aligned_offsets, worker_pool

_CHUNK_BYTES = 16 << 20  # bounds memory: each chunk's ids are held once before being written
_worker_dict: Dictionary | None = None
_STAGING = "preprocess"  # DESTDIR/.preprocess.tmp-HOST-PID-XXXX holds the files until all are done


def _init_worker(dict_path: str) -> None:
    global _worker_dict
    _worker_dict = Dictionary.load(dict_path)


def _encode_range(args: tuple[str, int, int]):
    path, start, end = args
    flat, sizes, replaced = _worker_dict.encode_lines(iter_lines(path, start, end))
    # Indices are < len(dictionary), which the dataset dtype holds: send them compact.
    return flat.astype(dtype_for_vocab(len(_worker_dict))), sizes, replaced


def binarize_file(
    input_path: str, dictionary: Dictionary, out_prefix: str, workers: int = 1, dict_path: str | None = None
) -> dict[str, int]:
    """Write OUT_PREFIX.bin/.idx for `input_path`; returns {'sequences', 'tokens', 'replaced'}.

    With workers > 1 the file is cut at line boundaries and the pieces are encoded in parallel
    (each worker loads the dictionary from `dict_path`); the output is the same.
    """
    if not os.path.isfile(input_path):
        raise UserError(f"input file not found: {input_path} (check --trainpref/--validpref/--testpref)")
    if os.path.getsize(input_path) == 0:
        raise UserError(f"{input_path} is empty: there is nothing to binarize; give a file with text")
    pieces = max(2 * workers if workers > 1 else 1, math.ceil(os.path.getsize(input_path) / _CHUNK_BYTES))
    offsets = line_aligned_offsets(input_path, pieces)
    ranges = [(input_path, a, b) for a, b in zip(offsets, offsets[1:])]
    stats = {"sequences": 0, "tokens": 0, "replaced": 0}
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(
            MMapIndexedDatasetBuilder(out_prefix, dtype_for_vocab(len(dictionary)), vocab_size=len(dictionary))
        )
        if workers > 1:
            if dict_path is None:
                raise ValueError("binarize_file with workers > 1 needs dict_path")
            pool = stack.enter_context(worker_pool(workers, _init_worker, (dict_path,)))
            results = pool.imap(_encode_range, ranges)
        else:
            results = (dictionary.encode_lines(iter_lines(path, a, b)) for path, a, b in ranges)
        for flat, sizes, replaced in results:
            out.add_items(flat, sizes)
            stats["sequences"] += len(sizes)
            stats["tokens"] += len(flat)
            stats["replaced"] += replaced
    return stats


def _splits(args) -> list[tuple[str, str]]:
    """(split name, input file) pairs, fairseq's naming: train, valid, valid1, ..., test, test1, ..."""
    out = []
    for split, prefixes in (("train", args.trainpref), ("valid", args.validpref), ("test", args.testpref)):
        if prefixes:
            for k, prefix in enumerate(prefixes.split(",")):
                out.append((split if k == 0 else f"{split}{k}", prefix))
    return out


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m m11b_jax.preprocess", description=__doc__.split("\n")[0])
    p.add_argument("--only-source", action="store_true", help="language-model data (required: the only mode)")
    p.add_argument("--trainpref", help="training text (one sequence per line)")
    p.add_argument("--validpref", help="validation text; comma-separated for several sets")
    p.add_argument("--testpref", help="test text; comma-separated for several sets")
    p.add_argument("--srcdict", required=True, help="fairseq dict.txt to map words to indices")
    p.add_argument("--destdir", default="data-bin", help="output folder (created if missing)")
    p.add_argument("--workers", type=int, default=1, help="processes binarizing in parallel")
    p.add_argument("--dataset-impl", default="mmap", help="only 'mmap' is supported")
    args = p.parse_args(argv)
    if not args.only_source:
        raise UserError("only language-model data is supported: pass --only-source")
    if args.dataset_impl != "mmap":
        raise UserError(f"--dataset-impl {args.dataset_impl} is not supported: use mmap")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    splits = _splits(args)
    if not splits:
        raise UserError("nothing to binarize: pass --trainpref, --validpref and/or --testpref")
    dictionary = Dictionary.load(args.srcdict)
    dest = fsutil.resolve(args.destdir)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --destdir: {fsutil.os_error_message(e)}") from None
    print(f"dictionary: {len(dictionary)} types ({args.srcdict})")
    # All or nothing: every split and dict.txt is built in a hidden folder inside DESTDIR, moved in at the end.
    fsutil.remove_stale_temporaries(dest / _STAGING)
    staging = fsutil.temp_path(dest / _STAGING)
    try:
        staging.mkdir()
        for split, path in splits:
            stats = binarize_file(path, dictionary, str(staging / split), args.workers, args.srcdict)
            pct = 100.0 * stats["replaced"] / max(stats["tokens"], 1)
            print(
                f"{split}: {path}: {stats['sequences']} sents, {stats['tokens']} tokens, "
                f"{pct:.3}% replaced by {SPECIALS[UNK]}"
            )
            fsutil.signal_hook_for_tests("preprocess-split")
        dictionary.save(staging / "dict.txt")
        names = [f"{split}.{ext}" for split, _ in splits for ext in ("bin", "idx")] + ["dict.txt"]
        for name in names:
            if (dest / name).is_dir():
                raise UserError(f"{dest / name} is a directory: remove it or choose another --destdir")
        for name in names:
            os.replace(staging / name, dest / name)
    finally:
        fsutil.remove_path(staging)
    print(f"wrote {', '.join(s for s, _ in splits)} and dict.txt to {args.destdir}")


if __name__ == "__main__":
    main()

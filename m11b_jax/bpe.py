"""`python -m m11b_jax.bpe`: text -> GPT-2 BPE ids as text, like fairseq's multiprocessing_bpe_encoder.

    python -m m11b_jax.bpe --encoder-json encoder.json --vocab-bpe vocab.bpe \\
        --inputs wiki.test.raw.detok --outputs wiki.test.bpe [--keep-empty] [--workers N]

Each line is stripped; an empty line is dropped unless --keep-empty (with several --inputs, the
lines at the same position are encoded together and dropped together when any is empty, as in
fairseq). Each kept line becomes its ids joined by spaces. '-' reads stdin / writes stdout.
Outputs appear only when the whole run succeeds.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from typing import Iterator, Sequence

from .errors import UserError, cli_main
from .textio import atomic_output, iter_lines, worker_pool
from .tokenizer import GPT2BPE

_BATCH_LINES = 1000
_worker_bpe: GPT2BPE | None = None


def encode_row(bpe: GPT2BPE, row: Sequence[str], keep_empty: bool) -> list[str] | None:
    """Encode the lines at one position of every input; None when the row is dropped as empty."""
    stripped = [line.strip() for line in row]
    if not keep_empty and any(not line for line in stripped):
        return None
    return [" ".join(map(str, bpe.encode(line))) for line in stripped]


def _init_worker(encoder_json: str, vocab_bpe: str) -> None:
    global _worker_bpe
    _worker_bpe = GPT2BPE.from_files(encoder_json, vocab_bpe)


def _encode_batch(args: tuple[list[tuple[str, ...]], bool]) -> list[list[str] | None]:
    rows, keep_empty = args
    return [encode_row(_worker_bpe, row, keep_empty) for row in rows]


def _rows(inputs: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """Lines of all inputs side by side; inputs of different lengths are an error."""
    readers = [iter_lines(p) for p in inputs]
    for row in itertools.zip_longest(*readers):
        if None in row:
            short = inputs[row.index(None)]
            raise UserError(f"--inputs have different numbers of lines ({short} ends first): give line-aligned files")
        yield row


def _batches(rows: Iterator[tuple[str, ...]], keep_empty: bool):
    while batch := list(itertools.islice(rows, _BATCH_LINES)):
        yield batch, keep_empty


def encode_files(
    encoder_json: str,
    vocab_bpe: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    keep_empty: bool = False,
    workers: int = 1,
) -> dict[str, int]:
    """Encode line-aligned `inputs` into `outputs`; returns {'lines': kept, 'empty': dropped}."""
    if len(inputs) != len(outputs):
        raise UserError(f"got {len(inputs)} --inputs but {len(outputs)} --outputs: give one output per input")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    bpe = GPT2BPE.from_files(encoder_json, vocab_bpe)  # in this process too: bad files fail early
    stats = {"lines": 0, "empty": 0}
    with contextlib.ExitStack() as stack:
        sinks = [stack.enter_context(atomic_output(p)) for p in outputs]
        batches = _batches(_rows(inputs), keep_empty)
        if workers > 1:
            pool = stack.enter_context(worker_pool(workers, _init_worker, (str(encoder_json), str(vocab_bpe))))
            results = pool.imap(_encode_batch, batches)
        else:
            results = ([encode_row(bpe, row, k) for row in rows] for rows, k in batches)
        for encoded in results:
            for row in encoded:
                if row is None:
                    stats["empty"] += 1
                    continue
                stats["lines"] += 1
                for sink, text in zip(sinks, row):
                    sink.write(text + "\n")
    return stats


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m m11b_jax.bpe", description=__doc__.split("\n")[0])
    p.add_argument("--encoder-json", required=True, help="GPT-2 encoder.json")
    p.add_argument("--vocab-bpe", required=True, help="GPT-2 vocab.bpe")
    p.add_argument("--inputs", nargs="+", default=["-"], help="input files ('-' = stdin)")
    p.add_argument("--outputs", nargs="+", default=["-"], help="output files ('-' = stdout), one per input")
    p.add_argument("--keep-empty", action="store_true", help="keep empty lines (as empty output lines)")
    p.add_argument("--workers", type=int, default=1, help="processes encoding in parallel")
    args = p.parse_args(argv)
    stats = encode_files(args.encoder_json, args.vocab_bpe, args.inputs, args.outputs, args.keep_empty, args.workers)
    print(f"encoded {stats['lines']} lines, dropped {stats['empty']} empty lines", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Binarizing BPE text with `python -m m11b_jax.preprocess`: MB/s with --workers 1 and 2.

    .venv/bin/python benchmarks/bench_binarize.py [--data-dir ../shared/data] [--copies 20]

The input is wiki.test.raw detokenized and GPT-2 BPE-encoded (2891 lines of ids), repeated
`--copies` times (~25 MB by default). Each setting runs the real CLI (process start included)
three times; the best wall time is reported, and the outputs must be byte-identical.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from m11b_jax.detok import detokenize_line  # noqa: E402
from m11b_jax.tokenizer import GPT2BPE  # noqa: E402


def bpe_text(data: pathlib.Path) -> str:
    bpe = GPT2BPE.from_files(data / "gpt2_bpe" / "encoder.json", data / "gpt2_bpe" / "vocab.bpe")
    raw = (data / "wikitext-103" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")[:-1]
    lines = [detokenize_line(line).strip() for line in raw]
    return "".join(" ".join(map(str, bpe.encode(line))) + "\n" for line in lines if line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--copies", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    data = pathlib.Path(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        src = tmp / "train.bpe"
        src.write_text(bpe_text(data) * args.copies)
        mb = src.stat().st_size / 1e6
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        outputs = {}
        for workers in (1, 2):
            best = float("inf")
            for _ in range(args.repeats):
                dest = tmp / f"bin{workers}"
                start = time.perf_counter()
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "m11b_jax.preprocess",
                        "--only-source",
                        "--trainpref",
                        str(src),
                        "--srcdict",
                        str(data / "gpt2_bpe" / "dict.txt"),
                        "--destdir",
                        str(dest),
                        "--workers",
                        str(workers),
                    ],
                    env=env,
                    check=True,
                    capture_output=True,
                )
                best = min(best, time.perf_counter() - start)
            outputs[workers] = (dest / "train.bin").read_bytes() + (dest / "train.idx").read_bytes()
            print(f"--workers {workers}: {best:.2f} s for {mb:.1f} MB = {mb / best:.1f} MB/s")
        assert outputs[1] == outputs[2], "outputs differ between worker counts"
        print(f"outputs identical; {os.cpu_count()} CPUs visible")


if __name__ == "__main__":
    main()

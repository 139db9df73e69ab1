"""Hugging Face export benchmark: peak RSS and MB/s of `python -m m11b_jax.convert --to-hf` at release sizes.

    python benchmarks/bench_hf_export.py [--layers 4] [--dtype float32] [--bpe-dir DIR] [--workdir DIR] [--json F]

Writes our params checkpoint of a model with the release's per-layer sizes (d 3072, ffn 18432, 32 heads,
vocab 51200) and `--layers` layers (random fp32 weights, written layer by layer; dict.51200.txt of the shared
data), then exports it in a subprocess under `/usr/bin/time -v` (peak RSS = "Maximum resident set size"), with
the tokenizer when --bpe-dir (default: the shared data's gpt2_bpe) is given. Judged by:
    peak RSS <= largest tensor (the embedding, 51200 x 3072, fp32 as stored) x 2 + 1 GiB = 2.17 GiB
MB/s = output bytes / the exporter's own time (its log line; imports excluded). The 72-layer estimate: the
same peak (the largest tensor, the embedding, is the same; one tensor is held at a time), time = 72-layer
bytes / MB/s. Everything it writes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
D, FFN, HEADS, VOCAB, RELEASE_LAYERS = 3072, 18432, 32, 51200, 72
GiB = 2**30


def write_checkpoint(path: pathlib.Path, layers: int, dict_file: pathlib.Path):
    from m11b_jax.config import load_config
    from m11b_jax.params_io import ParamsWriter

    cfg = load_config("transformer_lm_megatron_11b", num_layers=layers)
    rng = np.random.default_rng(0)
    with ParamsWriter(path, cfg, dict_file, dtype="float32") as w:
        for leaf, (shape, _) in w.specs.items():
            if leaf[0] == "layers":
                for i in range(shape[0]):
                    w.write(leaf, (i,), rng.standard_normal(shape[1:], dtype=np.float32) * 0.02)
            else:
                w.write(leaf, (), rng.standard_normal(shape, dtype=np.float32) * 0.02)
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--bpe-dir", default=str(REPO.parent / "shared" / "data" / "gpt2_bpe"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    bpe_dir = pathlib.Path(args.bpe_dir)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-hf-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        cfg = write_checkpoint(work / "ckpt", args.layers, bpe_dir / "dict.51200.txt")
        print(f"wrote the {args.layers}-layer checkpoint in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "m11b_jax.convert", "--to-hf", str(work / "ckpt"),
               str(work / "hf"), "--dtype", args.dtype, "--bpe-dir", str(bpe_dir)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"export failed:\n{proc.stderr[-3000:]}")
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
        m = re.search(r"wrote (\d+) MiB in (\d+) file\(s\) in ([\d.]+) s", proc.stderr)
        mib, files, seconds = int(m.group(1)), int(m.group(2)), float(m.group(3))
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
        largest = VOCAB * D * 4  # the embedding, as stored (fp32)
        bound = 2 * largest + GiB
        release_bytes = cfg.replace(num_layers=RELEASE_LAYERS).num_params() * itemsize
        out = {
            "layers": args.layers, "dtype": args.dtype, "tokenizer": "tokenizer" in proc.stdout,
            "files": files, "output_mib": mib, "export_s": round(seconds, 1), "wall_s_with_imports": round(wall, 1),
            "mb_per_s": round(mib * 2**20 / 1e6 / seconds, 1), "peak_rss_gib": round(rss / GiB, 3),
            "bound_gib": round(bound / GiB, 3), "ratio_to_bound": round(rss / bound, 3),
            "release_72_layers": {"output_gib": round(release_bytes / GiB, 1),
                                  "est_minutes": round(release_bytes / (mib * 2**20 / seconds) / 60, 1),
                                  "est_peak_rss_gib": round(rss / GiB, 3)},
        }
        print(json.dumps(out, indent=1))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"peak RSS {rss / GiB:.3f} GiB vs bound {bound / GiB:.3f} GiB (ratio {rss / bound:.3f}); "
              f"{out['mb_per_s']} MB/s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Training throughput of the `tiny` config on CPU, through the real training CLI (data loading, the sharded
jitted step, metrics): tokens/s (wps), model TFLOP/s and MFU (null: CPUs have no peak in the table).

    python benchmarks/bench_train_cpu.py [--updates 60] [--write benchmarks/RESULTS_train.md]

Each configuration runs `python -m m11b_jax.train` in a fresh process on the offline corpus (the default run's
data) with the global batch fixed at 16 x 128 tokens, and reports the median over its log intervals after the
first (the first update, which includes compilation, is never timed). Runs are sequential; a loaded machine
gives lower and noisier figures, so the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent

# name, extra flags (all runs: tiny, 128-token blocks, global batch 16)
CONFIGS = [
    ("offline default: mesh (4,2), sequence parallel", ["--model-parallel-size", "2", "--batch-size", "4"]),
    ("mesh (4,2), no sequence parallel", ["--model-parallel-size", "2", "--batch-size", "4", "--no-sequence-parallel"]),
    ("mesh (8,1), data parallel only", ["--model-parallel-size", "1", "--batch-size", "2"]),
    ("1 CPU device", ["--model-parallel-size", "1", "--batch-size", "16", "--distributed-world-size", "1"]),
]


def run_config(flags: list[str], updates: int, log_interval: int) -> dict:
    with tempfile.TemporaryDirectory() as save:
        cmd = [sys.executable, "-m", "m11b_jax.train", "--max-update", str(updates), "--log-interval",
               str(log_interval), "--disable-validation", "--no-save", "--no-progress-bar", "--save-dir", save, *flags]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        rows = [json.loads(x) for x in pathlib.Path(save, "train_log.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "loss" in r and r.get("wps")][1:]  # drop the interval right after compilation
    first = next(line for line in proc.stderr.splitlines() if "first update" in line)
    return {
        "wps": statistics.median(r["wps"] for r in timed),
        "model_tflops": statistics.median(r["model_tflops"] for r in timed),
        "mfu": timed[-1]["mfu"],
        "final_loss": rows[-1]["loss"],
        "first_update_s": float(first.split("took ")[1].rstrip("s")),
        "wall_s": wall,
        "command": "python -m m11b_jax.train " + " ".join(cmd[3:]).replace(save, "DIR"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=60)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--write", help="write a markdown report here")
    args = ap.parse_args()
    load_before = os.getloadavg()
    results = []
    for name, flags in CONFIGS:
        r = run_config(flags, args.updates, args.log_interval)
        r["name"] = name
        results.append(r)
        print(json.dumps(r), flush=True)
    load_after = os.getloadavg()
    lines = [
        "# Training throughput, `tiny` on CPU",
        "",
        f"`python benchmarks/bench_train_cpu.py --updates {args.updates}` on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), Python {platform.python_version()}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (the machine is shared: figures are lower bounds).",
        "",
        "Tiny: d 128, 2 layers, 8 heads, ffn 512, vocab 1024 (0.53M parameters); offline corpus; 128-token blocks; "
        "global batch 16 (2048 tokens per update); fp32; Adam. Median over log intervals of "
        f"{args.log_interval} updates, the first interval after compilation excluded. MFU is null on CPU "
        "(no peak in the table); model TFLOP/s uses the same FLOP count as MFU (6 N per token + attention).",
        "",
        "| configuration | tokens/s (wps) | model TFLOP/s | MFU | first update (compile) s | loss after "
        f"{args.updates} |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        mfu = "null" if r["mfu"] is None else f"{r['mfu']:.3f}"
        lines.append(f"| {r['name']} | {r['wps']:.0f} | {r['model_tflops']:.4f} | {mfu} | "
                     f"{r['first_update_s']:.1f} | {r['final_loss']:.3f} |")
    losses = [r["final_loss"] for r in results]
    lines += ["", f"Same seed and global batch on every mesh: the losses after {args.updates} updates agree to "
                  f"{max(losses) - min(losses):.1e} (base 2)."]
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in results] + [""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        pathlib.Path(args.write).write_text(text)


if __name__ == "__main__":
    main()

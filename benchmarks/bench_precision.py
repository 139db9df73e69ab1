"""The precision policies on the offline tiny run (CPU): validation perplexity after N updates against the fp32
run, and training throughput, through the real CLI.

    python benchmarks/bench_precision.py [--updates 200] [--policies fp32,fp16,bf16,...] [--rounds N]

Each policy runs `python -m m11b_jax.train` (the offline default: tiny model, offline corpus, 200 updates,
validation at 0/100/200) in a fresh process with its precision flag, and prints one JSON line: the last
validation perplexity, its ratio to the fp32 run's (the margin the fp16 policies are judged by), the number of
loss-scale overflows, the final loss scale, and the median tokens/s over the log intervals after the first.

With --rounds N the policies take turns N times (p1, p2, p1, p2, ...: a shared machine's load falls on both
alike) and a last JSON line gives each policy's median tokens/s over the rounds, the load averages seen, and
each policy's tokens/s relative to the first policy's.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
FLAGS = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"], "memory_efficient_fp16": ["--memory-efficient-fp16"],
         "memory_efficient_bf16": ["--memory-efficient-bf16"]}


def run_policy(policy: str, updates: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as save:
        cmd = [sys.executable, "-m", "m11b_jax.train", "--max-update", str(updates), "--no-save", "--no-progress-bar",
               "--save-dir", save, *FLAGS[policy], *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{policy}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        records = [json.loads(x) for x in (pathlib.Path(save) / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_ppl" in r] or [{"valid_ppl": None}]
    wps = [r["wps"] for r in train[1:] if r.get("wps")]
    return {"policy": policy, "updates": train[-1]["update"], "valid_ppl": valid[-1]["valid_ppl"],
            "train_loss": train[-1]["loss"], "overflows": sum(1 for r in records if r.get("overflow")),
            "loss_scale": train[-1].get("loss_scale"), "median_wps": statistics.median(wps) if wps else None,
            "wall_s": round(time.perf_counter() - t0, 1), "load_avg": os.getloadavg()[0],
            "command": "python -m m11b_jax.train " + " ".join(FLAGS[policy] + extra + ["--max-update", str(updates)])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--policies", default="fp32,fp16,memory_efficient_fp16,bf16,memory_efficient_bf16")
    ap.add_argument("--rounds", type=int, default=1, help="run the policies in turn this many times (default 1)")
    ap.add_argument("extra", nargs="*", help="more flags for every run (after --)")
    a = ap.parse_args()
    policies = a.policies.split(",")
    base = None
    wps: dict[str, list[float]] = {p: [] for p in policies}
    loads = []
    for r in range(a.rounds):
        for policy in policies:
            loads.append(round(os.getloadavg()[0], 2))
            row = run_policy(policy, a.updates, a.extra)
            row["round"] = r
            if policy == "fp32" and base is None:
                base = row["valid_ppl"]
            row["valid_ppl_vs_fp32"] = row["valid_ppl"] / base if base and row["valid_ppl"] else None
            if row["median_wps"]:
                wps[policy].append(row["median_wps"])
            print(json.dumps(row), flush=True)
    if a.rounds > 1:
        med = {p: statistics.median(v) if v else None for p, v in wps.items()}
        first = med[policies[0]]
        print(json.dumps({"rounds": a.rounds, "median_wps": med, "wps_per_round": wps,
                          f"wps_vs_{policies[0]}": {p: m / first if m and first else None for p, m in med.items()},
                          "load_avg_at_starts": loads, "load_avg_end": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()

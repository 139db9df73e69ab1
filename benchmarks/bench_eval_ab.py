"""eval_lm CPU throughput A/B: this tree against another checkout (e.g. main before a change), taking turns.

    git -C /work/main archive HEAD | tar -x -C /tmp/eval_base
    JAX_PLATFORMS=cpu python benchmarks/bench_eval_ab.py --baseline /tmp/eval_base [--rounds 3] [--tokens 4096]

Each round runs `benchmarks/bench_eval_cpu.py --json` of the baseline tree and of this tree, each in its own
process with its own tree first on the import path (same model, stream, window 1024 / context 992, batch 8); the
side that goes first alternates between rounds. Prints per round both sides' tokens/s (wall, best of --repeats)
and tokens per CPU-second (user + system time of the scoring process: less sensitive to other load on a shared
host), the 1-minute load average before each side, then the medians of the ratios this/baseline (goal for the
one-model eval: >= 0.95) and this tree's tokens/s against fairseq's 300 (goal >= 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
FAIRSEQ_TOKENS_PER_S = 300.0


def run(tree: pathlib.Path, tokens: int, repeats: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(tree)}
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, str(tree / "benchmarks" / "bench_eval_cpu.py"), "--json", "--tokens",
                           str(tokens), "--repeats", str(repeats), "--reference-tokens", "32"],
                          cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bench_eval_cpu.py of {tree} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {"tokens_per_s": out["eval_lm"]["tokens_per_s"], "tokens_per_cpu_s": out["eval_lm"]["tokens_per_cpu_s"],
            "max_abs_diff_vs_xglm": out["exactness_max_abs_logprob_diff_vs_xglm"], "load_1m_before": round(load, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, type=pathlib.Path, help="the other checkout's root folder")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    sides = {"baseline": args.baseline.resolve(), "this": REPO}
    rows = []
    for r in range(args.rounds):
        order = ["baseline", "this"] if r % 2 == 0 else ["this", "baseline"]
        got = {name: run(sides[name], args.tokens, args.repeats) for name in order}
        row = {"round": r, "first": order[0], "baseline": got["baseline"], "this": got["this"],
               "ratio_wall": round(got["this"]["tokens_per_s"] / got["baseline"]["tokens_per_s"], 3),
               "ratio_cpu_s": round(got["this"]["tokens_per_cpu_s"] / got["baseline"]["tokens_per_cpu_s"], 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    this_tps = statistics.median(r["this"]["tokens_per_s"] for r in rows)
    print(json.dumps({"rounds": len(rows), "median_ratio_wall": statistics.median(r["ratio_wall"] for r in rows),
                      "median_ratio_cpu_s": statistics.median(r["ratio_cpu_s"] for r in rows),
                      "median_this_tokens_per_s": this_tps,
                      "median_baseline_tokens_per_s": statistics.median(r["baseline"]["tokens_per_s"] for r in rows),
                      "median_this_vs_fairseq_300": round(this_tps / FAIRSEQ_TOKENS_PER_S, 2),
                      "goal": "ratios >= 0.95, >= 2x fairseq"}))


if __name__ == "__main__":
    main()

"""eval_lm CPU throughput A/B: this tree against another checkout (e.g. main before a change), sides taking turns.

    git -C /work/main archive HEAD | tar -x -C /tmp/eval_base
    JAX_PLATFORMS=cpu python benchmarks/bench_eval_ab.py --baseline /tmp/eval_base [--rounds 3] [--tokens 4096]

Both sides run the same measurement (this file, `--side TREE`, in a fresh process with TREE's m11b_jax first on
the import path) through the public `m11b_jax.eval_lm.evaluate`: bench_eval_cpu.py's model (d 128, 2 layers, 16
heads, ffn 768, vocab 256, fp32, one CPU device), window 1024 / context 992, batch 8, the same random stream.
Figures per side: tokens/s (wall, scoring only: evaluate's elapsed time, compile excluded; best of --repeats) and
tokens per CPU-second of scoring (user + system time of the process; less sensitive to other load on a shared
host). Each evaluate() call compiles its step, so the CPU figure is differential: (tokens of the stream - tokens
of one batch) / (CPU of scoring the stream - CPU of scoring one batch), both calls compiling the same program.
Also printed: compile seconds, the 1-minute load average before each side. The side that goes first alternates.
Summary: medians of the ratios this/baseline (goal for the one-model eval: >= 0.95) and this tree's tokens/s
against fairseq's 300 (benchmarks/RESULTS_eval.md; goal >= 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
FAIRSEQ_TOKENS_PER_S = 300.0
T, C, BATCH = 1024, 992, 8


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(tokens: int, repeats: int) -> dict:
    """In this process (m11b_jax from the tree on sys.path): the figures of one side."""
    import jax
    import numpy as np

    from m11b_jax import param_tree, sharding
    from m11b_jax.config import ModelConfig
    from m11b_jax.eval_lm import ContextWindows, evaluate

    cfg = ModelConfig(name="bench-d128", vocab_size=256, d_model=128, ffn_dim=768, num_layers=2, num_heads=16,
                      max_positions=T, remat_policy="none", scan_layers=False)
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    rules = sharding.logical_rules()
    params = param_tree.init_params(cfg, mesh, rules, seed=0)
    stream = np.random.default_rng(0).integers(4, cfg.vocab_size, tokens).astype(np.int32)
    stream[np.random.default_rng(1).random(tokens) < 0.02] = 2  # some </s>
    small = BATCH * (T - C)  # one batch of windows

    def run(n):
        c0 = cpu_seconds()
        result = evaluate(params, cfg, stream[:n], ContextWindows(n, T, C), mesh, rules, batch_size=BATCH)
        return result, cpu_seconds() - c0

    run(small)  # warm-up: first compile, imports, thread pools
    best = None
    for _ in range(repeats):
        one, one_cpu = run(small)
        full, full_cpu = run(tokens)
        row = {"tokens_per_s": tokens / full.elapsed_s,
               "tokens_per_cpu_s": (tokens - small) / max(full_cpu - one_cpu, 1e-9),
               "compile_s": full.compile_s, "logprob_sum": float(full.token_logprobs.sum())}
        if best is None or row["tokens_per_s"] > best["tokens_per_s"]:
            best = {**row, "tokens_per_cpu_s": max(row["tokens_per_cpu_s"], best["tokens_per_cpu_s"]) if best
                    else row["tokens_per_cpu_s"]}
        elif row["tokens_per_cpu_s"] > best["tokens_per_cpu_s"]:
            best["tokens_per_cpu_s"] = row["tokens_per_cpu_s"]
    return {k: round(v, 3) if k != "logprob_sum" else v for k, v in best.items()}


def run_side(tree: pathlib.Path, tokens: int, repeats: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(tree)}
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--side", str(tree), "--tokens", str(tokens), "--repeats",
                           str(repeats)], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"the measurement of {tree} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_1m_before": round(load, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", type=pathlib.Path, help="the other checkout's root folder")
    p.add_argument("--side", type=pathlib.Path, help=argparse.SUPPRESS)  # internal: measure this tree, print JSON
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.side is not None:
        sys.path.insert(0, str(args.side.resolve()))
        import m11b_jax

        if pathlib.Path(m11b_jax.__file__).resolve().parent.parent != args.side.resolve():
            sys.exit(f"imported {m11b_jax.__file__}, not the tree {args.side}")
        print(json.dumps(measure(args.tokens, args.repeats)))
        return
    if args.baseline is None:
        p.error("--baseline is required")
    sides = {"baseline": args.baseline.resolve(), "this": REPO}
    rows = []
    for r in range(args.rounds):
        order = ["baseline", "this"] if r % 2 == 0 else ["this", "baseline"]
        got = {name: run_side(sides[name], args.tokens, args.repeats) for name in order}
        row = {"round": r, "first": order[0], "baseline": got["baseline"], "this": got["this"],
               "ratio_wall": round(got["this"]["tokens_per_s"] / got["baseline"]["tokens_per_s"], 3),
               "ratio_cpu_s": round(got["this"]["tokens_per_cpu_s"] / got["baseline"]["tokens_per_cpu_s"], 3),
               "logprob_sum_diff": abs(got["this"]["logprob_sum"] - got["baseline"]["logprob_sum"])}
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

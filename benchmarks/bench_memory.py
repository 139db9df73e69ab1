"""Per-device memory of the full 11B train step (8 x 1024 tokens, mesh (1, 8)), compiled ahead of time.

fp32 parameters and fp32 Adam moments are kept; matmuls run in bf16 (the `--memory-efficient-fp16` /
`--bf16` policy). For every remat policy, with and without sequence parallelism, it prints the compiled
per-device total and the ratio to the goal (23 GiB on the CPU compile, 22 GiB on the H100-target compile).

    python benchmarks/bench_memory.py                       # 8 simulated CPU devices
    python benchmarks/bench_memory.py --target h100         # needs `pip install -e .[cuda-aot]`, no GPU
"""

from __future__ import annotations

import argparse
import json
import os

GOAL_GIB = {"cpu": 23.0, "h100": 22.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="a GPU from m11b_jax.targets (default: 8 simulated CPU devices)")
    ap.add_argument("--policies", default="none,full,save_dots,save_dots_no_batch")
    args = ap.parse_args()
    if args.target is None:
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from m11b_jax import aot
    from m11b_jax.config import load_config

    name = args.target or "cpu"
    goal = GOAL_GIB.get(name)
    mesh = aot.target_mesh(args.target, 8, 8)
    rows = []
    for policy in args.policies.split(","):
        for sp in (True, False):
            cfg = load_config("transformer_lm_megatron_11b", remat_policy=policy, compute_dtype="bfloat16")
            r = aot.compile_report(cfg, mesh, batch_size=8, tokens_per_sample=1024, sequence_parallel=sp,
                                   target=args.target)
            gib = r["per_device_bytes"]["total"] / 2**30
            gathers = r["collectives"]["all-gather"]["shapes"]
            rows.append({"target": name, "remat_policy": policy, "sequence_parallel": sp,
                         "total_gib": round(gib, 2), "temporaries_gib": round(r["per_device_bytes"]["temporaries"] / 2**30, 2),
                         "ratio_to_goal": round(gib / goal, 3) if goal else None,
                         "logits_or_weight_gathered": any("51200" in s or "6400" in s or "18432" in s for s in gathers),
                         "compile_s": r["compile_s"]})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n| target | remat | seq-parallel | per-device GiB | temporaries GiB | ratio to {goal} GiB goal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['remat_policy']} | {r['sequence_parallel']} | {r['total_gib']} | "
              f"{r['temporaries_gib']} | {r['ratio_to_goal']} |")


if __name__ == "__main__":
    main()

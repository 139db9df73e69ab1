"""Per-device memory of the full 11B train step, compiled ahead of time; and the TPU fit table.

Default mode: 8 x 1024 tokens on mesh (1, 8), fp32 parameters and fp32 Adam moments, bf16 matmuls (the
`--memory-efficient-fp16` / `--bf16` policy). For every remat policy, with and without sequence parallelism, it
prints the compiled per-device total and the ratio to the goal (23 GiB on the CPU compile, 22 GiB on the
H100-target compile).

    python benchmarks/bench_memory.py                       # 8 simulated CPU devices
    python benchmarks/bench_memory.py --target h100         # needs `pip install -e .[cuda-aot]`, no GPU

Fit table (`--targets`): the release at the seed's global batch (2 blocks of 1024 tokens per update) on whole
TPU slices, each with the best settings the code offers for it (FIT_SETTINGS: model axis, FSDP, remat policy;
always bf16 matmuls, fp32 parameters and Adam state, sequence parallelism). Needs `pip install -e .[tpu-aot]`,
no TPU. For every slice it prints the exact per-chip bytes of the train state (parameters + Adam moments, from
the shardings: no compile), and, for the slices named in --compile (default: all; about 5 minutes each on 2
cores), the TPU compiler's per-chip total, its FLOPs and bytes, and the FSDP collectives. A row "fits" when the
compiled total leaves >= 10% of the chip's HBM free.

    python benchmarks/bench_memory.py --targets v4-8,v4-16,v5e-8,v5e-16,v5p-8,v5p-16,v6e-8 --compile v4-16
"""

from __future__ import annotations

import argparse
import json
import os
import time

GOAL_GIB = {"cpu": 23.0, "h100": 22.0}
HEADROOM = 0.10  # a "fits" row leaves at least this fraction of HBM free
SEED_GLOBAL_BATCH = 2  # --max-sentences 2 on 8 GPUs with --model-parallel-size 8: one data-parallel replica

# The best settings the code offers per slice: (model-parallel size, --fsdp, remat policy, why).
FIT_SETTINGS = {
    "v4-8": (4, False, "full", "4 chips: the model axis is at most 4 and the data axis is 1, so FSDP has nothing to "
                               "split over"),
    "v4-16": (8, False, "full", "8 chips of 32 GiB: tensor parallelism over all 8, full remat"),
    "v5e-8": (8, False, "full", "8 chips of 16 GiB: every 8-chip layout shards the train state 8 ways"),
    "v5e-16": (8, True, "full", "16 chips of 16 GiB: model axis 8 x data axis 2 with FSDP (state sharded 16 ways)"),
    "v5p-8": (4, False, "none", "4 chips of 95 GiB: tensor parallelism over all 4, room to keep every activation "
                                "(no recompute)"),
    "v5p-16": (8, False, "none", "8 chips of 95 GiB: room to keep every activation (no recompute)"),
    "v6e-8": (4, True, "full", "8 chips of 32 GiB: model axis 4 x data axis 2 with FSDP (libtpu 0.0.42.1 crashes "
                              "compiling v4-16's (1, 8) layout for v6e)"),
}


def state_bytes_per_chip(cfg, mesh, fsdp: bool) -> int:
    """Parameters + Adam moments + counters on the most loaded device, from the shardings (nothing compiled)."""
    import jax
    import numpy as np

    from m11b_jax import sharding as S
    from m11b_jax.train_step import OptimConfig, abstract_train_state

    state = abstract_train_state(cfg, mesh, S.logical_rules(sequence_parallel=True, fsdp=fsdp), OptimConfig())
    return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in jax.tree.leaves(state))


def fit_row(name: str, compile_it: bool) -> dict:
    from m11b_jax import aot
    from m11b_jax import targets as T
    from m11b_jax.config import load_config

    spec = T.TPU_TARGETS[name]
    mp, fsdp, policy, why = FIT_SETTINGS[name]
    hbm = T.memory_bytes(name)
    mesh = aot.target_mesh(name, None, mp)
    data = mesh.shape["data"]
    cfg = load_config("transformer_lm_megatron_11b", remat_policy=policy, compute_dtype="bfloat16")
    flags = (f"--target {name} --model-parallel-size {mp} --batch-size {SEED_GLOBAL_BATCH // data} "
             f"--remat-policy {policy}" + (" --fsdp" if fsdp else ""))
    row = {"target": name, "chips": spec.chips, "hosts": spec.hosts, "hbm_gib": spec.hbm_gib,
           "mesh": dict(mesh.shape), "fsdp": fsdp, "remat_policy": policy, "settings": why, "flags": flags,
           "state_gib": round(state_bytes_per_chip(cfg, mesh, fsdp) / 2**30, 2)}
    if row["state_gib"] * 2**30 > (1 - HEADROOM) * hbm:
        row["verdict"] = (f"does not fit: parameters + Adam state alone are {row['state_gib']} GiB per chip, more "
                          f"than {1 - HEADROOM:.0%} of {spec.hbm_gib} GiB (exact, from the shardings)")
    if not compile_it:
        row["compiled"] = "not compiled in this run"
        row.setdefault("verdict", "not decided: not compiled")
        return row
    t0 = time.perf_counter()
    try:
        r = aot.compile_report(cfg, mesh, batch_size=SEED_GLOBAL_BATCH // data, tokens_per_sample=1024,
                               sequence_parallel=True, target=name, fsdp=fsdp)
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses programs that exceed HBM
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        row["compiled"] = f"refused by the TPU compiler after {time.perf_counter() - t0:.0f} s: {first[:400]}"
        row.setdefault("verdict", "does not fit (compiler)")
        return row
    mem, coll = r["per_device_bytes"], r["collectives"]
    total = mem["total"]
    row.update({
        "compiled": "yes", "compile_s": r["compile_s"],
        "total_gib": round(total / 2**30, 2), "arguments_gib": round(mem["arguments"] / 2**30, 2),
        "temporaries_gib": round(mem["temporaries"] / 2**30, 2),
        "headroom": round(1 - total / hbm, 3),
        "xla_flops_per_chip": r["compiled_per_device"]["flops"],
        "xla_bytes_accessed_per_chip": r["compiled_per_device"]["bytes_accessed"],
        "analytic_flops_per_chip": r["flops_per_step"] / spec.chips,
        "collective_counts": {k: v["count"] for k, v in coll.items() if v["count"]},
        "collectives_inside_layer_loops": r["collectives_inside_layer_loops"],
        "whole_layer_stack_collectives": r["whole_layer_stack_collectives"],
        "all_gather_shapes": coll["all-gather"]["shapes"][:12],
        "reduce_scatter_shapes": coll["reduce-scatter"]["shapes"][:12],
    })
    row["verdict"] = "fits" if total <= (1 - HEADROOM) * hbm else (
        f"does not fit with {HEADROOM:.0%} headroom ({row['total_gib']} of {spec.hbm_gib} GiB)")
    return row


def fit_table(names: list[str], compile_names: set[str]) -> None:
    from m11b_jax import targets as T

    for n in names:
        T.check_target(n)
        if not T.is_tpu(n):
            raise SystemExit(f"--targets takes TPU slices ({', '.join(T.TPU_TARGETS)}), not {n}")
    rows = []
    for n in names:
        rows.append(fit_row(n, n in compile_names))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| slice | chips (hosts) | HBM GiB | mesh (data, model) | FSDP | remat | state GiB/chip | "
          "compiled GiB/chip | headroom | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["mesh"]
        print(f"| {r['target']} | {r['chips']} ({r['hosts']}) | {r['hbm_gib']} | ({m['data']}, {m['model']}) | "
              f"{'yes' if r['fsdp'] else 'no'} | {r['remat_policy']} | {r['state_gib']} | "
              f"{r.get('total_gib', '-')} | {r.get('headroom', '-')} | {r['verdict']} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="a GPU from m11b_jax.targets (default: 8 simulated CPU devices)")
    ap.add_argument("--policies", default="none,full,save_dots,save_dots_no_batch")
    ap.add_argument("--targets", help="comma-separated TPU slices: print the fit table instead")
    ap.add_argument("--compile", help="with --targets: compile only these slices (default: all of --targets)")
    args = ap.parse_args()
    if args.target is None and args.targets is None:
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.targets:
        names = [n for n in args.targets.split(",") if n]
        fit_table(names, set(names if args.compile is None else [n for n in args.compile.split(",") if n]))
        return

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

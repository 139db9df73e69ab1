"""One-GPU training throughput of a ~1.3B config of the same code, and the full 11B compile-only reports.

    PYTHONPATH=. python benchmarks/gpu_train.py [--budget-s 300]

Part 1: configs/megatron_1p3b.json (d 2048, 24 layers, ffn 8192, 16 heads, vocab 51200; 1.31B params),
fp32 params + fp32 Adam, bf16 compute, 1024-token sequences, on one GPU: tokens/s and MFU for several remat
policies, batch sizes and dropout generators (within a time budget). MFU convention: model FLOPs
6*N_matmul*tokens + attention (QK^T and PV, 4*L*T*d per token forward, x3 for fwd+bwd) per second, over the
chip's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s); remat recompute is not counted as useful work.
Part 1b (`--precisions`): the same step under each precision policy (m11b_jax.precision: bf16 and fp16 compute,
fp32 or 16-bit parameters, fp16 with fairseq's loss scaler): step time, tokens/s, loss, overflows, peak memory.
Part 2: the 11B train step (8 x 1024 tokens, mesh (1, 8)) compiled for 8 GPUs of this machine's kind
(JAX's CUDA topology, no 8 GPUs needed): per-device memory with full remat, with/without sequence parallelism.
Prints one JSON line per measurement and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import jax
import numpy as np

from m11b_jax import aot
from m11b_jax import sharding
from m11b_jax.config import analytic_train_flops, load_config
from m11b_jax.precision import POLICIES, LossScaleConfig
from m11b_jax.targets import peak_flops
from m11b_jax.train_step import OptimConfig, init_train_state, make_train_step

ROWS: list[dict] = []


def emit(row: dict) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def train_throughput(arch: str, policy: str, batch: int, rng_impl: str, steps: int = 6) -> dict:
    cfg = load_config(arch, remat_policy=policy, compute_dtype="bfloat16")
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    rules = sharding.logical_rules()
    ocfg = OptimConfig(lr=1e-4, warmup_updates=100)
    state = init_train_state(cfg, mesh, rules, ocfg)
    step = make_train_step(cfg, mesh, rules, ocfg, rng_impl=rng_impl)
    b, t = _random_batch(cfg, batch)
    state, m, compile_s = _first_step(step, state, b)
    state, m = step(state, b)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, b)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    return {"part": "train_1.3b", "arch": arch, "remat_policy": policy, "batch": batch, "rng_impl": rng_impl,
            "params": cfg.num_params(), **_speed(cfg, batch, t, dt), "loss": float(m["loss"]),
            "compile_s": round(compile_s, 1), "peak_mem_gib": _peak_mem_gib()}


def _random_batch(cfg, batch: int):
    """({"source", "target"} of one micro-batch [1, batch, T] of random ids on the device, T = max_positions)."""
    t = cfg.max_positions
    tok = np.random.default_rng(0).integers(4, cfg.vocab_size, (1, batch, t + 1)).astype(np.int32)
    return {"source": jax.device_put(tok[:, :, :-1]), "target": jax.device_put(tok[:, :, 1:])}, t


def _first_step(step, state, b):
    """The first call (compile + one step): (state, metrics, its seconds)."""
    t0 = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m)
    return state, m, time.perf_counter() - t0


def _speed(cfg, batch: int, t: int, dt: float) -> dict:
    """step_s, tokens_per_s and MFU (analytic FLOPs over the device's bf16 peak; None for an unknown device)."""
    peak = peak_flops(jax.devices()[0].device_kind)
    return {"step_s": round(dt, 4), "tokens_per_s": round(batch * t / dt),
            "mfu": round(analytic_train_flops(cfg, batch, t) / dt / peak, 4) if peak else None}


def _peak_mem_gib() -> float:
    return round((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30, 2)


def precision_step(arch: str, precision: str, batch: int, remat: str = "save_dots_no_batch", steps: int = 6) -> dict:
    """The one-GPU step under a precision policy (the fp16 ones with fairseq's loss scaler, initial scale 128)."""
    pol = POLICIES[precision]
    cfg = load_config(arch, remat_policy=remat, param_dtype=pol.param_dtype, compute_dtype=pol.compute_dtype)
    mesh, rules = sharding.make_mesh(1, jax.devices()[:1]), sharding.logical_rules()
    ocfg = OptimConfig(lr=1e-4, warmup_updates=100)
    scaler = LossScaleConfig(scale_window=2048) if pol.loss_scaling else None
    state = init_train_state(cfg, mesh, rules, ocfg, loss_scale=scaler)
    step = make_train_step(cfg, mesh, rules, ocfg, rng_impl="rbg", loss_scale=scaler)
    b, t = _random_batch(cfg, batch)
    state, m, compile_s = _first_step(step, state, b)
    overflows = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, b)
        overflows += int(float(m.get("overflow", 0.0)))  # a host read per step: the fp16 loop reads it too
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    return {"part": "precision", "arch": arch, "precision": precision, "remat_policy": remat, "batch": batch,
            **_speed(cfg, batch, t, dt), "loss": float(m["loss"]), "overflows": overflows,
            "loss_scale": float(m.get("loss_scale", 1.0)), "update": int(m["update"]), "compile_s": round(compile_s, 1),
            "peak_mem_gib": _peak_mem_gib()}


def compile_11b(sp: bool, target: str) -> dict:
    cfg = load_config("transformer_lm_megatron_11b", remat_policy="full", compute_dtype="bfloat16")
    mesh = aot.target_mesh(target, 8, 8)
    r = aot.compile_report(cfg, mesh, batch_size=8, tokens_per_sample=1024, sequence_parallel=sp, target=target)
    return {"part": "compile_11b", "target": target, "sequence_parallel": sp,
            "per_device_gib": round(r["per_device_bytes"]["total"] / 2**30, 2), "compile_s": r["compile_s"],
            "all_gather_shapes": r["collectives"]["all-gather"]["shapes"],
            "reduce_scatter_count": r["collectives"]["reduce-scatter"]["count"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="megatron_1p3b")
    ap.add_argument("--skip-11b", action="store_true")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new throughput runs after this")
    ap.add_argument("--variants", default="save_dots_no_batch:8:rbg,full:8:rbg,save_dots:8:rbg,"
                                          "save_dots_no_batch:16:rbg,save_dots_no_batch:8:threefry2x32")
    ap.add_argument("--precisions", default="bf16,fp16,memory_efficient_fp16,memory_efficient_bf16",
                    help="part 1b: precision policies to time (empty: skip)")
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(json.dumps({"jax": jax.__version__, "device": dev.device_kind, "platform": dev.platform}), flush=True)
    start = time.perf_counter()
    for v in filter(None, args.variants.split(",")):
        if time.perf_counter() - start > args.budget_s:
            print(json.dumps({"skipped": v, "reason": "time budget"}), flush=True)
            continue
        policy, batch, rng = v.split(":")
        try:
            emit(train_throughput(args.arch, policy, int(batch), rng))
        except Exception as e:  # report and go on: one failed variant must not lose the others
            emit({"part": "train_1.3b", "variant": v, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            traceback.print_exc()
    for precision in [p for p in args.precisions.split(",") if p]:
        if time.perf_counter() - start > args.budget_s:
            print(json.dumps({"skipped": precision, "reason": "time budget"}), flush=True)
            continue
        try:
            emit(precision_step(args.arch, precision, 8))
        except Exception as e:
            emit({"part": "precision", "precision": precision, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            traceback.print_exc()
    kind = "h200" if "H200" in dev.device_kind else "h100"
    for sp in () if args.skip_11b else (True, False):
        try:
            emit(compile_11b(sp, kind))
        except Exception as e:
            emit({"part": "compile_11b", "sequence_parallel": sp, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    print("\n| remat | batch x 1024 | dropout rng | step s | tokens/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in ROWS:
        if r["part"] == "train_1.3b" and "error" not in r:
            print(f"| {r['remat_policy']} | {r['batch']} | {r['rng_impl']} | {r['step_s']} | {r['tokens_per_s']} | "
                  f"{r['mfu']} | {r['peak_mem_gib']} |")


if __name__ == "__main__":
    main()

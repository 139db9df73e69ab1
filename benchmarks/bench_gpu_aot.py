"""GPU train steps compiled ahead of time for an absent GPU (`--target h100`): memory, fused attention, traffic.

    PYTHONPATH=. python benchmarks/bench_gpu_aot.py --target h100 [--only 1.3b|11b] [--settings default]

Needs `pip install -e ".[cuda-aot]"` (JAX's CUDA plugin and the cuDNN wheel; no GPU, driver or CUDA toolkit).
For each setting it compiles the whole train step (forward, backward, Adam) and prints one JSON line:
  - per_device_gib: the compiled program's arguments + outputs - aliased + temporaries, per device;
  - fused_attention_calls: custom calls of the fused attention (the Pallas/Triton flash kernels by name, or
    cuDNN's __cudnn$fmha*), and attention_forwards: how many of them are forward kernels (per program text: a
    scanned layer body counts once; with remat "full" the forward appears again in the backward loop);
  - btt_arrays: materialized arrays with two axes of length T (the [B, H, T, T] scores/probabilities/mask);
  - traffic_gb: bytes read + written per step by the kernels of the compiled program (each top-level
    instruction's operands + results, loop bodies times their trip count; fusion internals are not memory
    traffic), by category: matmul (cuBLAS / Triton GEMM fusions of the projections and logits), attention
    (fused attention kernels), attention_unfused (GEMM fusions that read or write a [.., T, T] array: the
    current path's scores and probabilities), collective, other (everything else); non_matmul_gb is the sum of
    all but matmul and collective (the fused kernels' own reads and writes included).
Settings: 1.3B (configs/megatron_1p3b.json, bf16 compute, batch 16 x 1024, one GPU): today's default
(attention autodiff + remat save_dots_no_batch) against flash + save_attention (dropout 0.1) and cudnn +
save_attention (dropout 0); `--rows` picks which of these to compile. 11B release step (8 x 1024 tokens, mesh
(1, 8), full remat + sequence parallelism): autodiff vs flash. Goals: 1.3B non-matmul traffic >= 2x lower than
today's; no [B,H,T,T] arrays; 11B flash <= 22 GiB per device.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's m11b_jax

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\(.*?\)|[\w]+\[[\d,]*\](?:\{[^}]*\})?)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "iota"}
_COLLECTIVE = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def shape_bytes(shape: str, stacked: int | None = None) -> int:
    """Bytes of an HLO shape (tuples summed). stacked=n (inside a loop of n trips): an array whose leading axis
    is n is a scanned stack of per-layer arrays, of which one iteration reads or writes one slice (1/n)."""
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        n = 1
        dims = [int(d) for d in filter(None, dims.split(","))]
        for d in dims:
            n *= d
        if stacked and len(dims) >= 2 and dims[0] == stacked:
            n //= stacked
        total += n * _BYTES[dtype]
    return total


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            if line.startswith("ENTRY"):
                comps["__entry__"] = name
            comps[name] = []
        elif name and line.strip() and line.strip() != "}":
            comps[name].append(line)
    return comps


def analyze(hlo: str, seq_len: int) -> dict:
    """Per-step kernel traffic by category, attention custom calls, and [.., T, T] arrays of an optimized HLO."""
    comps = _computations(hlo)
    entry = comps.pop("__entry__")
    mult, trips_of = {entry: 1}, {entry: None}
    order = [entry]
    for comp in order:  # executed computations: entry, loop bodies (x trip count), conditional branches
        for line in comps[comp]:
            m = _INSTR.match(line)
            if not m:
                continue
            if m.group(3) == "while":
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
                mult[body] = mult[comp] * (int(trips.group(1)) if trips else 1)
                trips_of[body] = int(trips.group(1)) if trips else None
                order.append(body)
            elif m.group(3) == "conditional":
                for b in re.findall(r"%([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", line) or
                                                     re.search(r"(true_computation=\S+)", line)).group(1)):
                    mult[b], trips_of[b] = mult[comp], trips_of[comp]
                    order.append(b)
    traffic = defaultdict(float)
    fwd = calls = 0
    btt = set()
    for comp in order:
        shapes = {}
        for line in comps[comp]:
            m = _INSTR.match(line)
            if not m:
                continue
            name, shape, op, rest = m.groups()
            shapes[name] = shape
            btt.update(_tt_arrays(shape, seq_len))
            if op in _FREE:
                continue
            operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0] if "), " in rest else rest)
            n = trips_of[comp]
            nbytes = shape_bytes(shape, n) + sum(shape_bytes(shapes.get(o, ""), n) for o in operands)
            if op.replace("-start", "").replace("-done", "") in _COLLECTIVE:
                cat = "collective" if not op.endswith("-done") else None
            elif op == "custom-call" and ("flash_attention" in line or "__cudnn$fmha" in line):
                cat = "attention"
                calls += 1
                fwd += "flash_attention_fwd" in line or ("__cudnn$fmha" in line and "Backward" not in line)
            elif (op in ("dot", "convolution") or (op == "custom-call" and ("gemm" in line or "cublas" in line))
                  or (op == "fusion" and _fusion_is_matmul(line, comps))):
                # GEMMs that read or write [.., T, T] are the unfused attention's (scores, probabilities)
                io = [shape] + [shapes.get(o, "") for o in operands]
                cat = "attention_unfused" if any(_has_tt(x, seq_len) for x in io) else "matmul"
            else:
                cat = "other"
            if cat:
                traffic[cat] += nbytes * mult[comp]
    return {"traffic_gb": {k: round(v / 1e9, 2) for k, v in sorted(traffic.items())},
            "non_matmul_gb": round(sum(v for k, v in traffic.items() if k not in ("matmul", "collective")) / 1e9, 2),
            "fused_attention_calls": calls, "attention_forwards": fwd, "btt_arrays": sorted(btt)}


def _tt_arrays(shape: str, seq_len: int) -> list[str]:
    """The arrays of a shape with two axes of length T (rank >= 3): [B, H, T, T] scores and their kin."""
    out = []
    for dtype, dims in _SHAPE.findall(shape):
        d = [int(x) for x in filter(None, dims.split(","))]
        if len(d) >= 3 and d.count(seq_len) >= 2:
            out.append(f"{dtype}[{dims}]")
    return out


def _has_tt(shape: str, seq_len: int) -> bool:
    return bool(_tt_arrays(shape, seq_len))


def _fusion_is_matmul(line: str, comps: dict) -> bool:
    if "gemm" in line:  # Triton GEMM fusions name themselves in their backend config
        return True
    called = re.search(r"calls=%?([\w.\-]+)", line)
    body = comps.get(called.group(1), []) if called else []
    return any(re.search(r"\s(dot|convolution)\(|__cublas|gemm", b) for b in body)


def run_setting(label, cfg, mesh, batch, seq, sp, target, compiler_options=None, save_hlo=None):
    from m11b_jax import aot

    t0 = time.perf_counter()
    compiled, _ = aot.compile_train_step(cfg, mesh, batch_size=batch, tokens_per_sample=seq, sequence_parallel=sp,
                                         compiler_options=compiler_options)
    mem = aot.memory(compiled)
    row = {"setting": label, "target": target, "arch": cfg.name, "mesh": list(mesh.devices.shape), "batch": batch,
           "attention_impl": cfg.attention_impl, "remat_policy": cfg.remat_policy,
           "attention_dropout": cfg.attention_dropout, "sequence_parallel": sp,
           "per_device_gib": round(mem["total"] / 2**30, 2), "temporaries_gib": round(mem["temporaries"] / 2**30, 2)}
    text = compiled.as_text()
    row.update(analyze(text, seq))
    if save_hlo:
        os.makedirs(save_hlo, exist_ok=True)
        with open(os.path.join(save_hlo, label.replace(" ", "_") + ".hlo.txt"), "w") as f:
            f.write(text)
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="h100", help="a GPU from m11b_jax.targets")
    ap.add_argument("--only", choices=("1.3b", "11b", "none"), default=None)
    ap.add_argument("--settings", default="default", help="GPU compiler settings (m11b_jax.targets) for the 1.3B")
    ap.add_argument("--rows", default="today,flash,cudnn",
                    help="the 1.3B settings to compile (comma-separated): today, flash, cudnn")
    ap.add_argument("--save-hlo", default=None, help="also write each compiled program's text to this folder")
    ap.add_argument("--from-hlo", default=None, help="only analyze the programs saved by --save-hlo in this folder")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from m11b_jax import aot
    from m11b_jax.config import load_config
    from m11b_jax.targets import compiler_options

    rows = []
    if args.from_hlo:
        import glob

        for path in sorted(glob.glob(os.path.join(args.from_hlo, "*.hlo.txt"))):
            with open(path) as f:
                rows.append({"setting": os.path.basename(path)[:-8].replace("_", " "), **analyze(f.read(), 1024)})
            print(json.dumps(rows[-1]), flush=True)
        args.only = "none"
    if args.only in (None, "1.3b"):
        mesh = aot.target_mesh(args.target, 1, 1)
        base = load_config("megatron_1p3b", compute_dtype="bfloat16")
        opts = compiler_options(args.settings)
        settings = {
            "today": base,
            "flash": base.replace(attention_impl="flash", remat_policy="save_attention"),
            "cudnn": base.replace(attention_impl="cudnn", remat_policy="save_attention", attention_dropout=0.0),
        }
        unknown = set(args.rows.split(",")) - set(settings)
        if unknown:
            sys.exit(f"unknown --rows {sorted(unknown)}: choose from {', '.join(settings)}")
        for label, cfg in ((k, v) for k, v in settings.items() if k in args.rows.split(",")):
            rows.append(run_setting(f"1.3b {label}", cfg, mesh, 16, 1024, False, args.target, opts, args.save_hlo))
    if args.only in (None, "11b"):
        mesh = aot.target_mesh(args.target, 8, 8)
        base = load_config("transformer_lm_megatron_11b", compute_dtype="bfloat16", remat_policy="full")
        for label, cfg in [("today", base), ("flash", base.replace(attention_impl="flash"))]:
            rows.append(run_setting(f"11b {label}", cfg, mesh, 8, 1024, True, args.target, None, args.save_hlo))
    by = {r["setting"]: r for r in rows}
    if "1.3b today" in by and "1.3b flash" in by:
        other = lambda r: r["non_matmul_gb"]  # noqa: E731
        print(json.dumps({"goal": "1.3B non-matmul traffic >= 2x lower than today's",
                          "ratio_today_over_flash": round(other(by["1.3b today"]) / max(other(by["1.3b flash"]), 1e-9), 2),
                          "ratio_today_over_cudnn": round(other(by["1.3b today"]) / max(other(by.get("1.3b cudnn", by["1.3b flash"])), 1e-9), 2)}))
    if "11b flash" in by:
        print(json.dumps({"goal": "11B flash <= 22 GiB per device", "per_device_gib": by["11b flash"]["per_device_gib"],
                          "ratio_to_goal": round(by["11b flash"]["per_device_gib"] / 22.0, 3)}))


if __name__ == "__main__":
    main()

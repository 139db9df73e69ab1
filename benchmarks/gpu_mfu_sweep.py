"""The prepared GPU sweep for the 1.3B config: one process, one JSON line per result, stops before its budget.

    PYTHONPATH=. python benchmarks/gpu_mfu_sweep.py --budget-s 400          # on one H100/H200
    PYTHONPATH=. python benchmarks/gpu_mfu_sweep.py --dry-run --budget-s 60  # the same logic on CPU, toy sizes

In order of value (what does not fit the remaining budget is printed as {"skipped": ...}):
  1. matmul ceiling: bf16 GEMMs of the 1.3B layer shapes (tokens x d x 3d... as XLA runs them), TFLOP/s;
  2. attention forward+backward at the 1.3B shapes (b 16, T 1024, 16 heads of 128): the current XLA path
     (einsums, fp32 softmax, dropout), cudnn (dropout 0), flash (dropout 0 and 0.1); ms and TFLOP/s;
  3. full train steps (fp32 params + Adam, bf16 compute, 1024 tokens): flash (attention dropout 0.1) and cudnn
     (dropout 0) with remat save_attention, batch 16 and 32, layers scanned or unrolled, GPU compiler settings
     default / all (m11b_jax.targets.GPU_COMPILER_SETTINGS), and the current path (autodiff attention,
     save_dots_no_batch) as control: step s, tokens/s, MFU, compiled per-device memory, peak device memory;
  4. a short profile of the best step, device time summed by kernel category.
MFU convention: model FLOPs per step = 6 * N_matmul * tokens + causal attention, 3 x (QK^T + PV over the
visible half of the scores: 2 * 2 * d * T(T+1)/2 per sequence and layer), over the chip's dense bf16 peak
(H100/H200 SXM 989 TFLOP/s); remat recompute is not useful work. `mfu_full_attention` also reports the older
convention (non-causal attention FLOPs, benchmarks/gpu_train.py's 30.7%).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
import traceback
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Budget:
    """Wall-clock budget: a step runs only if its estimate fits what is left (a reserve kept for the profile)."""

    def __init__(self, seconds: float, reserve: float):
        self.t0, self.total, self.reserve = time.perf_counter(), seconds, reserve

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.t0)

    def fits(self, estimate: float, final: bool = False) -> bool:
        return self.left() - (0 if final else self.reserve) >= estimate


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def causal_model_flops(cfg, batch: int, seq: int) -> float:
    d, f, L = cfg.d_model, cfg.ffn_dim, cfg.num_layers
    n_matmul = L * (4 * d * d + 2 * d * f) + cfg.vocab_size * d
    attention_fwd = L * 2 * 2 * d * seq * (seq + 1) / 2 * batch
    return 6.0 * n_matmul * batch * seq + 3.0 * attention_fwd


def _time(fn, *args, reps: int):
    import jax

    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def matmul_ceiling(cfg, tokens: int, reps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    d, f, v = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    rows = []
    for name, (m, k, n) in {"qkv/out": (tokens, d, d), "fc1": (tokens, d, f), "fc2": (tokens, f, d),
                            "logits": (tokens, d, v)}.items():
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
        dt = _time(jax.jit(lambda a, b: a @ b), a, b, reps=reps)
        rows.append({"part": "matmul", "shape": name, "mkn": [m, k, n], "ms": round(dt * 1e3, 3),
                     "tflops": round(2 * m * k * n / dt / 1e12, 1)})
    return rows


def _current_attention(q, k, v, lengths, rate, key):
    """The XLA path of attention_impl autodiff: [B,H,T,T] scores, fp32 softmax, dropout from the generator."""
    import jax
    import jax.numpy as jnp

    t = q.shape[1]
    allowed = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])[None, None] & (
        jnp.arange(t)[None, None, None, :] < lengths[:, None, None, None])
    s = jnp.where(allowed, jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32), jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    if rate:
        p = jnp.where(jax.random.bernoulli(key, 1 - rate, p.shape), p / (1 - rate), 0).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def attention_bench(impl: str, rate: float, b, t, h, hd, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from m11b_jax import flash_attention as F

    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(kk, (b, t, h, hd), jnp.bfloat16) for kk in ks)
    lengths = jnp.full((b,), t, jnp.int32)
    seed = jnp.uint32(1)

    def fwd(q, k, v):
        if impl == "flash":
            return F.flash_attention(q, k, v, lengths, seed, rate=rate)
        if impl == "cudnn":
            return F.cudnn_attention(q, k, v, lengths)
        return _current_attention(q, k, v, lengths, rate, jax.random.key(2))

    def fwd_bwd(q, k, v, g):
        out, vjp = jax.vjp(fwd, q, k, v)
        return out, vjp(g)

    dt_f = _time(jax.jit(fwd), q, k, v, reps=reps)
    dt = _time(jax.jit(fwd_bwd), q, k, v, g, reps=reps)
    flops = 3 * F.causal_flops(b, t, h, hd)  # forward + backward (2x), causal half
    return {"part": "attention", "impl": impl, "attention_dropout": rate, "shape": [b, t, h, hd],
            "fwd_ms": round(dt_f * 1e3, 3), "fwd_bwd_ms": round(dt * 1e3, 3), "tflops_causal": round(flops / dt / 1e12, 1)}


class Steps:
    """Full train steps sharing one train state (the parameter tree is the same for every setting)."""

    def __init__(self, cfg, seq: int):
        self.cfg, self.seq = cfg, seq
        self.state = self.best = None

    def _init(self):  # on first use, inside the first step's budget
        import jax

        from m11b_jax import sharding as S
        from m11b_jax.train_step import OptimConfig, init_train_state

        self.mesh = S.make_mesh(1, jax.devices()[:1])
        self.rules = S.logical_rules()
        self.ocfg = OptimConfig(lr=1e-4, warmup_updates=100)
        self.state = init_train_state(self.cfg, self.mesh, self.rules, self.ocfg)

    def run(self, label: str, cfg, batch: int, settings: str, steps: int) -> dict:
        import jax
        import numpy as np

        from m11b_jax import aot
        from m11b_jax.flash_attention import check_platform
        from m11b_jax.targets import compiler_options, peak_flops
        from m11b_jax.train_step import make_train_step

        if self.state is None:
            self._init()
        dev = jax.devices()[0]
        check_platform(cfg.attention_impl, dev.platform)
        opts = compiler_options(settings) if dev.platform == "gpu" else {}
        step = make_train_step(cfg, self.mesh, self.rules, self.ocfg, rng_impl="rbg" if dev.platform == "gpu"
                               else "threefry2x32")
        tok = np.random.default_rng(0).integers(4, cfg.vocab_size, (1, batch, self.seq + 1)).astype(np.int32)
        b = {"source": jax.device_put(tok[:, :, :-1]), "target": jax.device_put(tok[:, :, 1:])}
        t0 = time.perf_counter()
        compiled = step.lower(self.state, b).compile(opts or None)
        compile_s = time.perf_counter() - t0
        self.state, m = compiled(self.state, b)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.state, m = compiled(self.state, b)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / steps
        peak = peak_flops(dev.device_kind)
        flops = causal_model_flops(cfg, batch, self.seq)
        from m11b_jax.config import analytic_train_flops

        mem = dev.memory_stats() or {}
        row = {"part": "step", "setting": label, "attention_impl": cfg.attention_impl,
               "attention_dropout": cfg.attention_dropout, "remat_policy": cfg.remat_policy,
               "scan_layers": cfg.scan_layers, "compiler_settings": settings, "batch": batch,
               "step_s": round(dt, 4), "tokens_per_s": round(batch * self.seq / dt),
               "mfu": round(flops / dt / peak, 4) if peak else None,
               "mfu_full_attention": round(analytic_train_flops(cfg, batch, self.seq) / dt / peak, 4) if peak else None,
               "compiled_gib": round(aot.memory(compiled)["total"] / 2**30, 4),
               "peak_device_gib": round(mem.get("peak_bytes_in_use", 0) / 2**30, 2),
               "loss": round(float(m["loss"]), 4), "compile_s": round(compile_s, 1)}
        score = row["tokens_per_s"]
        if cfg.attention_impl != "autodiff" and (self.best is None or score > self.best[0]):
            self.best = (score, label, compiled, b)
        return row

    def profile(self, steps: int) -> dict:
        import jax

        _, label, compiled, b = self.best
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                for _ in range(steps):
                    self.state, m = compiled(self.state, b)
                jax.block_until_ready(m)
            files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
            totals = kernel_categories(files[0]) if files else {}
        return {"part": "profile", "setting": label, "steps": steps,
                "device_ms_per_step": {k: round(v / steps / 1e6, 2) for k, v in sorted(totals.items())}}


def category(name: str) -> str:
    n = name.lower()
    if "flash_attention" in n or "fmha" in n or "cudnn" in n:
        return "attention"
    if any(s in n for s in ("gemm", "cublas", "cutlass", "xmma", "nvjet", "matmul", "dot")):
        return "matmul"
    if any(s in n for s in ("nccl", "all-reduce", "all-gather", "reduce-scatter")):
        return "collective"
    if "memcpy" in n or "memset" in n or n.startswith("copy"):
        return "copy"
    if "fusion" in n or "loop_" in n or "input_" in n or "reduce" in n or "triton" in n:
        return "elementwise/reduction fusion"
    return "other"


def kernel_categories(path: str) -> dict:
    """ns of device time by category from an xplane.pb (GPU planes; the host's XLA ops on a CPU)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    planes = [p for p in data.planes if p.name.startswith("/device:GPU")] or \
             [p for p in data.planes if p.name.startswith("/host:CPU")]
    totals = defaultdict(float)
    for plane in planes:
        lines = list(plane.lines)
        # GPU: the CUDA stream lines hold the kernels (the "XLA Ops" line repeats them as HLO ops); CPU: XLA ops
        wanted = [ln for ln in lines if ("Stream" in ln.name if plane.name.startswith("/device") else "XLA" in ln.name)]
        for line in wanted or lines:
            for ev in line.events:
                totals[category(ev.name)] += ev.duration_ns
    return dict(totals)


def plan(dry: bool):
    """(label, config changes, batch, compiler settings) of the full steps, most valuable first."""
    flash = dict(attention_impl="flash", remat_policy="save_attention", attention_dropout=0.1)
    cudnn = dict(attention_impl="cudnn", remat_policy="save_attention", attention_dropout=0.0)
    current = dict(attention_impl="autodiff", remat_policy="save_dots_no_batch", attention_dropout=0.1)
    b0, b1 = (2, 4) if dry else (16, 32)
    if dry:  # the cheapest first (flash runs its kernels in Pallas interpret mode on a CPU: slow to compile)
        return [("current b16 scan (control)", current, b0, "default"), ("flash b16 scan", flash, b0, "default"),
                ("flash b32 unrolled settings=all", {**flash, "scan_layers": False}, b1, "all")]
    return [
        ("flash b16 scan", flash, b0, "default"),
        ("cudnn b16 scan", cudnn, b0, "default"),
        ("current b16 scan (control)", current, b0, "default"),
        ("flash b16 unrolled", {**flash, "scan_layers": False}, b0, "default"),
        ("flash b16 scan settings=all", flash, b0, "all"),
        ("flash b32 scan", flash, b1, "default"),
        ("cudnn b32 scan", cudnn, b1, "default"),
        ("cudnn b16 unrolled", {**cudnn, "scan_layers": False}, b0, "default"),
        ("flash b16 scan settings=no_triton_gemm", flash, b0, "no_triton_gemm"),
        ("flash b32 unrolled settings=all", {**flash, "scan_layers": False}, b1, "all"),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop before this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="run the same logic on CPU at toy sizes (for tests)")
    ap.add_argument("--step-estimate-s", type=float, default=None,
                    help="assumed seconds per full-step setting before one has been measured (compile + runs)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from m11b_jax.config import load_config

    budget = Budget(args.budget_s, reserve=0.1 * args.budget_s)
    dev = jax.devices()[0]
    dry = args.dry_run
    if dry:
        cfg = load_config("tiny", d_model=64, ffn_dim=128, num_heads=2, num_layers=2, max_positions=64,
                          vocab_size=256, compute_dtype="bfloat16")
        seq, reps, steps, attn_shape = 64, 2, 2, (1, 64, 2, 32)
    else:
        cfg = load_config("megatron_1p3b", compute_dtype="bfloat16")
        seq, reps, steps, attn_shape = 1024, 10, 5, (16, 1024, cfg.num_heads, cfg.head_dim)
    emit({"part": "setup", "device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
          "arch": cfg.name, "params": cfg.num_params(), "budget_s": args.budget_s, "dry_run": dry,
          "mfu_convention": "(6*N_matmul*tokens + 3*causal attention QK^T+PV FLOPs) / step_s / dense bf16 peak"})

    def guarded(kind, estimate, fn, final=False):
        if not budget.fits(estimate, final):
            emit({"skipped": kind, "reason": f"budget: {budget.left():.0f} s left, needs ~{estimate:.0f} s"})
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # one failure must not end the sweep
            emit({"part": kind, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
                  "where": traceback.format_exc().strip().splitlines()[-3:]})
            out = None
        for row in out if isinstance(out, list) else [out] if out else []:
            row["elapsed_s"] = round(time.perf_counter() - t0, 1)
            emit(row)
        return time.perf_counter() - t0

    guarded("matmul", 2 if dry else 15, lambda: matmul_ceiling(cfg, seq * (2 if dry else 16), reps))
    for impl, rate in (("current", 0.1), ("cudnn", 0.0), ("flash", 0.0), ("flash", 0.1)):
        if impl == "cudnn" and dev.platform != "gpu":
            emit({"skipped": f"attention {impl}", "reason": "needs an NVIDIA GPU"})
            continue
        guarded(f"attention {impl}", 5 if dry and impl != "flash" else 30 if dry else 20,
                lambda impl=impl, rate=rate: attention_bench(impl, rate, *attn_shape, reps))

    runner = Steps(cfg, seq)
    estimate = args.step_estimate_s or (20.0 if dry else 60.0)
    for label, changes, batch, settings in plan(dry):
        step_cfg = cfg.replace(**changes)
        if dev.platform != "gpu" and step_cfg.attention_impl == "cudnn":
            emit({"skipped": label, "reason": "needs an NVIDIA GPU"})
            continue
        took = guarded(label, estimate, lambda c=step_cfg, b=batch, s=settings: runner.run(label, c, b, s, steps))
        if took:
            estimate = max(estimate * 0.5, took * (2 if batch > 16 else 1.2))  # what the next one likely needs
    if runner.best is not None:
        guarded("profile", 3 if dry else 20, lambda: runner.profile(2 if dry else 3), final=True)
    emit({"part": "done", "elapsed_s": round(args.budget_s - budget.left(), 1)})


if __name__ == "__main__":
    main()

"""Decoding on one GPU: the 11B-shaped model in bf16, greedy, batch 1: ms per token against the bandwidth limit.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_decode.py [--out results.json] [--new-tokens 128] [--bandwidth-gbs 4800]

Not run yet (written in a session without a GPU). Steps, each printing one JSON line (a failing step is reported,
not fatal):
  1. parity: a small random model's greedy tokens on the GPU (fp32, 'highest' matmul precision) equal the same
     on the CPU devices of the same process;
  2. compile-only: the 11B decode step in bf16 on this one GPU, batch 8 x cache 1024 (per-device memory);
  3. the 11B (transformer_lm_megatron_11b) with random bf16 weights on ONE GPU, batch 1, a 32-token prompt:
     ms per new token = (time of N+1 new tokens - time of 1 new token) / N, compile excluded (best of 3),
     against the limit weight bytes / memory bandwidth (each step reads every weight once; ~22.1 GB / 4.8 TB/s
     = ~4.6 ms on an H200). Goal: <= 1.3x the limit. --bandwidth-gbs sets the GPU's bandwidth (H200: 4800,
     H100 SXM: 3350).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write all results here as one JSON object")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="GPU memory bandwidth, GB/s (H200: 4800)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from m11b_jax import param_tree, sharding
    from m11b_jax.config import load_config
    from m11b_jax.generation import Generator, SearchOptions

    results = {}

    def record(name, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # a failing step is reported, the others still run
            out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=3)}
        out = {"step": name, "seconds": round(time.perf_counter() - t0, 1), **out}
        results[name] = out
        print(json.dumps(out), flush=True)
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(results, indent=1))

    gpu = jax.devices()[0]
    rng = np.random.default_rng(0)

    def parity():
        cfg = load_config("tiny", dropout=0.0, attention_dropout=0.0)
        prompts = [[2] + rng.integers(4, 1000, n).tolist() for n in (5, 9, 14, 3)]
        out = {}
        for name, dev in (("gpu", gpu), ("cpu", jax.devices("cpu")[0])):
            mesh = sharding.make_mesh(1, [dev])
            params = param_tree.init_params(cfg, mesh, sharding.logical_rules(), seed=0)
            out[name] = [r.tokens for r in Generator(cfg, params, mesh).generate(prompts, SearchOptions(max_new_tokens=24))]
        return {"same_tokens": out["gpu"] == out["cpu"], "gpu": out["gpu"][0][:8], "cpu": out["cpu"][0][:8]}

    def compile_only():
        from m11b_jax.generate import compile_only_report

        cfg = load_config("transformer_lm_megatron_11b", param_dtype="bfloat16", compute_dtype="bfloat16",
                          dropout=0.0, attention_dropout=0.0)
        rep = compile_only_report(cfg, sharding.make_mesh(1, [gpu]), batch_size=8, cache_len=1024)
        return {"per_device_gib": round(rep["per_device_bytes"]["total"] / 2**30, 2),
                "per_device_bytes": rep["per_device_bytes"], "device": gpu.device_kind}

    def decode_11b():
        cfg = load_config("transformer_lm_megatron_11b", param_dtype="bfloat16", compute_dtype="bfloat16",
                          dropout=0.0, attention_dropout=0.0)
        mesh = sharding.make_mesh(1, [gpu])
        params = param_tree.init_params(cfg, mesh, sharding.logical_rules(), seed=0)
        weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
        gen = Generator(cfg, params, mesh)
        prompt = [[2] + rng.integers(4, cfg.vocab_size, 31).tolist()]

        def timed(n):
            gen.generate(prompt, SearchOptions(max_new_tokens=n))  # compile
            best, tokens = None, None
            for _ in range(3):
                t0 = time.perf_counter()
                res = gen.generate(prompt, SearchOptions(max_new_tokens=n))
                dt = time.perf_counter() - t0
                best, tokens = (dt, len(res[0].tokens)) if best is None or dt < best else (best, tokens)
            return best, tokens

        one, _ = timed(1)
        many, produced = timed(args.new_tokens + 1)
        steps = produced - 1
        ms = (many - one) / max(steps, 1) * 1e3
        limit = weight_bytes / (args.bandwidth_gbs * 1e9) * 1e3
        del params, gen
        jnp.zeros(()).block_until_ready()
        return {"device": gpu.device_kind, "weight_bytes": weight_bytes, "new_tokens": produced,
                "ms_per_token": round(ms, 3), "bandwidth_limit_ms": round(limit, 3),
                "ratio_to_limit": round(ms / limit, 3), "goal": "<= 1.3", "prefill_plus_one_s": round(one, 3)}

    record("parity_gpu_cpu_greedy", parity)
    record("compile_only_11b_decode_bf16_one_gpu", compile_only)
    record("decode_11b_bf16_batch1", decode_11b)


if __name__ == "__main__":
    main()

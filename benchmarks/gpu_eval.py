"""eval_lm on one GPU: throughput of the ~1.3B config in bf16, the 11B eval step's memory, parity with the CPU.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_eval.py [--out results.json] [--tokens 16384] [--skip-11b-run]

Steps (each prints one JSON line and is added to --out as it finishes; a failing step is reported, not fatal):
  1. parity: a small random model's per-token log-probs under eval_lm's rule on the GPU in fp32 (eval_lm uses
     'highest' matmul precision for fp32) against the same on the CPU devices of the same process;
  2. throughput: configs/megatron_1p3b.json, random weights, bfloat16, one GPU, window 1024 / context 992,
     for a few batch sizes / attention chunks (tokens/s, compile excluded; model TFLOP/s = 2 * matmul params
     * 1024 tokens per window + causal attention, i.e. what a plain full forward per window would do);
  3. the 11B (transformer_lm_megatron_11b) in bfloat16 on ONE GPU: compile-only memory of the eval step;
  4. unless --skip-11b-run: random 11B bf16 weights on that GPU and a short scored stream (tokens/s).
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

T, C = 1024, 992


def window_flops(cfg) -> float:
    """Forward FLOPs of one full 1024-token window (matmuls + causal attention), the usual model-FLOPs count."""
    d, f, L = cfg.d_model, cfg.ffn_dim, cfg.num_layers
    matmul = L * (4 * d * d + 2 * d * f) + cfg.vocab_size * d
    return 2.0 * matmul * T + L * 2 * T * T * d  # QK^T and PV over the causal half: 2 * (2 * T^2 d / 2)


def random_stream(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = rng.integers(4, vocab, n).astype(np.int32)
    s[rng.random(n) < 0.02] = 2
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write all results here as one JSON object")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens scored per 1.3B throughput run")
    ap.add_argument("--tokens-11b", type=int, default=2048, help="tokens scored with the 11B")
    ap.add_argument("--skip-11b-run", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny stand-ins for the 1.3B (to check the script on a CPU)")
    a = ap.parse_args()

    import jax

    from m11b_jax import param_tree, sharding
    from m11b_jax.aot import compile_eval_report
    from m11b_jax.config import ModelConfig, load_config
    from m11b_jax.eval_lm import ContextWindows, evaluate
    from m11b_jax.params_io import eval_config

    results: dict = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}

    def emit(name, value):
        results[name] = value
        print(json.dumps({name: value}), flush=True)
        if a.out:
            pathlib.Path(a.out).write_text(json.dumps(results, indent=2))

    def step(name, fn):
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # report and go on with the next step
            value = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:500], "trace": traceback.format_exc()[-2000:]}
        if isinstance(value, dict):
            value["step_s"] = round(time.perf_counter() - t0, 1)
        emit(name, value)

    gpu = jax.devices()[0]
    rules = sharding.logical_rules()
    mesh = sharding.make_mesh(1, [gpu])

    def parity():
        cfg = ModelConfig(name="parity", vocab_size=512, d_model=256, ffn_dim=1024, num_layers=4, num_heads=8,
                          max_positions=T, remat_policy="none")
        stream = random_stream(512 if a.smoke else 4096, cfg.vocab_size, seed=1)
        windows = ContextWindows(stream.size, T, C)
        cpu_mesh = sharding.make_mesh(1, jax.devices("cpu")[:1])
        params_cpu = param_tree.init_params(cfg, cpu_mesh, rules, seed=2)
        ref = evaluate(params_cpu, cfg, stream, windows, cpu_mesh, rules, batch_size=8).token_logprobs
        params_gpu = jax.device_put(params_cpu, param_tree.param_shardings(cfg, mesh, rules))
        got = evaluate(params_gpu, cfg, stream, windows, mesh, rules, batch_size=8).token_logprobs
        return {"max_abs_diff": float(np.abs(got - ref).max()), "max_abs_logprob": float(np.abs(ref).max()),
                "tokens": int(stream.size)}

    def throughput():
        cfg = eval_config(load_config("megatron_1p3b"), "bfloat16")
        if a.smoke:
            cfg = cfg.replace(d_model=64, ffn_dim=128, num_layers=2, num_heads=4, vocab_size=512)
        params = param_tree.init_params(cfg, mesh, rules, seed=0)
        stream = random_stream(a.tokens, cfg.vocab_size)
        windows = ContextWindows(stream.size, T, C)
        runs = []
        for batch, chunk in ((8, 256), (32, 256), (32, 1024)):
            r = evaluate(params, cfg, stream, windows, mesh, rules, batch_size=batch, attention_chunk=chunk, passes=1)
            tps = stream.size / r.elapsed_s
            runs.append({"batch": batch, "attention_chunk": chunk, "tokens_per_s": round(tps, 1),
                         "model_tflops": round(tps / windows.block * window_flops(cfg) / 1e12, 1),
                         "compile_s": round(r.compile_s, 1), "loss_base2": round(r.loss_base2, 3)})
            print(json.dumps(runs[-1]), flush=True)
        return {"config": "megatron_1p3b", "params": cfg.num_params(), "dtype": "bfloat16", "tokens": int(stream.size),
                "runs": runs}

    def memory_11b():
        cfg = eval_config(load_config("transformer_lm_megatron_11b"), "bfloat16")
        report = compile_eval_report(cfg, mesh, batch_size=8, tokens_per_sample=T, context_window=C)
        report["per_device_gib"] = {k: round(v / 2**30, 2) for k, v in report["per_device_bytes"].items()}
        return report

    def run_11b():
        cfg = eval_config(load_config("transformer_lm_megatron_11b"), "bfloat16")
        t0 = time.perf_counter()
        params = param_tree.init_params(cfg, mesh, rules, seed=0)
        jax.block_until_ready(params)
        init_s = time.perf_counter() - t0
        stream = random_stream(a.tokens_11b, cfg.vocab_size)
        windows = ContextWindows(stream.size, T, C)
        r = evaluate(params, cfg, stream, windows, mesh, rules, batch_size=8)
        stats = gpu.memory_stats() or {}
        tps = stream.size / r.elapsed_s
        return {"tokens": int(stream.size), "tokens_per_s": round(tps, 1),
                "model_tflops": round(tps / windows.block * window_flops(cfg) / 1e12, 1),
                "compile_s": round(r.compile_s, 1), "init_s": round(init_s, 1),
                "peak_bytes_in_use_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
                "release_test_set_minutes_at_this_rate": round(270847 / tps / 60, 1)}

    step("parity_fp32_gpu_vs_cpu", parity)
    step("throughput_1p3b_bf16", throughput)
    step("memory_11b_bf16_one_gpu", memory_11b)
    if not (a.skip_11b_run or a.smoke):
        step("run_11b_bf16_one_gpu", run_11b)


if __name__ == "__main__":
    main()

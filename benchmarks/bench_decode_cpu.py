"""Greedy decoding on CPU: m11b_jax.generation against transformers' XGLMForCausalLM.generate (KV cache), same
process, same weights, sides taking turns.

    JAX_PLATFORMS=cpu python benchmarks/bench_decode_cpu.py [--rounds 3] [--new-tokens 128] [--json]

Model: 4 layers, d 256, 4 heads, ffn 1024, vocab 51200, random weights, fp32, one device. Batch 8 left-padded
prompts of 32 tokens (the first 8 rows of different lengths 17..32, so padding is exercised), 128 new tokens,
greedy, pad suppressed on both sides. Prints each round's seconds per side, the median ratio ours/theirs (goal
<= 0.5) and whether both produced the same tokens (they must).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # xglm_reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import torch

    from m11b_jax import param_tree, sharding
    from m11b_jax.config import ModelConfig
    from m11b_jax.generation import Generator, SearchOptions, left_pad
    from xglm_reference import xglm_from_params

    cfg = ModelConfig(name="bench_decode", vocab_size=51200, d_model=256, ffn_dim=1024, num_layers=4, num_heads=4,
                      max_positions=1024, dropout=0.0, attention_dropout=0.0, remat_policy="none")
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    rules = sharding.logical_rules()
    params = param_tree.init_params(cfg, mesh, rules, seed=0)
    gen = Generator(cfg, params, mesh, rules)
    hf = xglm_from_params(params, cfg)

    rng = np.random.default_rng(0)
    lengths = [args.prompt - (i * 15) // max(args.batch - 1, 1) for i in range(args.batch)]
    prompts = [[2] + rng.integers(4, cfg.vocab_size, n - 1).tolist() for n in lengths]
    opts = SearchOptions(max_new_tokens=args.new_tokens)
    ids = torch.from_numpy(left_pad(prompts, len(prompts), args.prompt, 1).astype(np.int64))
    mask = (ids != 1).long()

    def ours():
        return [r.tokens for r in gen.generate(prompts, opts)]

    def theirs():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                              num_beams=1, pad_token_id=1, eos_token_id=2, suppress_tokens=[1], use_cache=True)
        rows = []
        for row in out[:, args.prompt:].tolist():
            rows.append(row[: row.index(2) + 1] if 2 in row else row)
        return rows

    t0 = time.perf_counter()
    a = ours()  # compiles
    compile_s = time.perf_counter() - t0
    b = theirs()
    same = a == b
    times = {"ours": [], "theirs": []}
    for _ in range(args.rounds):
        for name, fn in (("ours", ours), ("theirs", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratios = [o / t for o, t in zip(times["ours"], times["theirs"])]
    result = {
        "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
        "tokens_generated": sum(map(len, a)), "same_tokens": same, "ours_compile_s": round(compile_s, 2),
        "ours_s": [round(x, 3) for x in times["ours"]], "theirs_s": [round(x, 3) for x in times["theirs"]],
        "ratio_median": round(statistics.median(ratios), 3), "goal": "<= 0.5",
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    if not same:
        sys.exit("the two sides produced different tokens")


if __name__ == "__main__":
    main()

"""CPU train-step time, ours vs a PyTorch implementation of the same model and batch, in the same run.

PyTorch side: transformers' XGLMForCausalLM (the same function as fairseq's transformer_lm: see
tests/test_model.py) + torch.optim.Adam, fp32, eager. Our side: the jitted train step (forward, backward,
fairseq Adam update; fp32) on one CPU device, layers unrolled, remat off, the manual attention backward, the
fused output loss and the transposed weight gradients (the choices that suit small CPU runs), with freed host
memory kept by the allocator for both sides (m11b_jax.runtime.retain_host_memory). The two sides take turns in
three blocks of steps (ours, theirs, ours, ...: see time_interleaved); prints the median seconds per step for
both and the ratio ours/theirs (goal <= 1.0).

    python benchmarks/bench_cpu_step.py            # configs (a) vocab 51200 and (b) vocab 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
import torch

from m11b_jax import runtime
from m11b_jax import sharding
from m11b_jax.config import ATTENTION_IMPLS, LOSS_IMPLS, WEIGHT_GRAD_IMPLS, ModelConfig
from m11b_jax.train_step import OptimConfig, init_train_state, make_train_step

CONFIGS = {
    "a": dict(vocab_size=51200, d_model=256, ffn_dim=1536, num_layers=4, num_heads=8),
    "b": dict(vocab_size=1024, d_model=256, ffn_dim=1536, num_layers=4, num_heads=8),
}
BATCH, SEQ = 8, 256


def time_interleaved(fns: dict, warmup: int, steps: int, rounds: int = 3) -> dict:
    """Median seconds per call of each function. The sides take turns in `rounds` blocks (A: 1 untimed call, then
    steps/rounds timed; B: the same; A again ...), so slow drifts in the machine's speed (other tenants) hit both
    sides alike while each timed call still follows a call of its own side, as in training."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    per_round = max(1, -(-steps // rounds))
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ours(cfg: ModelConfig, tokens: np.ndarray):
    """A zero-argument function running one train step (and waiting for it)."""
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    rules = sharding.logical_rules()
    ocfg = OptimConfig(lr=1e-4, warmup_updates=10, weight_decay=0.01)
    state = init_train_state(cfg, mesh, rules, ocfg)
    step = make_train_step(cfg, mesh, rules, ocfg)
    batch = {"source": tokens[None, :, :-1], "target": tokens[None, :, 1:]}
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return run


def theirs(cfg: ModelConfig, tokens: np.ndarray):
    from transformers import XGLMConfig, XGLMForCausalLM

    torch.manual_seed(0)
    model = XGLMForCausalLM(XGLMConfig(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
        attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions, scale_embedding=True,
        activation_function="gelu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, attn_implementation="eager")).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    src = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    tgt = torch.from_numpy(tokens[:, 1:].astype(np.int64))
    mask = torch.ones_like(src)

    def run():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=src, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=1)
        loss.backward()
        opt.step()

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="a,b")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--attention-impl", default="manual", choices=ATTENTION_IMPLS,
                    help="our attention core (default: manual, the CPU-suited one; see m11b_jax/attention.py)")
    ap.add_argument("--loss-impl", default="fused", choices=LOSS_IMPLS,
                    help="our output projection + loss (default: fused; see m11b_jax.loss.output_cross_entropy)")
    ap.add_argument("--weight-grad-impl", default="transposed", choices=WEIGHT_GRAD_IMPLS,
                    help="weight gradients of the projections (default: transposed; see "
                         "m11b_jax.ops.matmul_flat_weight_grad)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="keep glibc's default allocator settings (see m11b_jax.runtime.retain_host_memory)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    # Process-wide, so the PyTorch side runs with the same allocator settings as ours.
    retained = False if args.system_malloc else runtime.retain_host_memory()
    print(json.dumps({"retain_host_memory": retained, "attention_impl": args.attention_impl,
                      "loss_impl": args.loss_impl, "weight_grad_impl": args.weight_grad_impl,
                      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "load_avg": os.getloadavg()[0]}), flush=True)
    rows = []
    for name in args.configs.split(","):
        cfg = ModelConfig(name=name, max_positions=SEQ, dropout=0.0, attention_dropout=0.0, remat_policy="none",
                          attention_impl=args.attention_impl, loss_impl=args.loss_impl,
                          weight_grad_impl=args.weight_grad_impl, scan_layers=False,
                          **CONFIGS[name])
        tokens = np.random.default_rng(0).integers(4, cfg.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
        t = time_interleaved({"ours": ours(cfg, tokens), "theirs": theirs(cfg, tokens)}, args.warmup, args.steps)
        t_ours, t_theirs = t["ours"], t["theirs"]
        rows.append({"config": name, **CONFIGS[name], "tokens": BATCH * SEQ, "ours_s": round(t_ours, 4),
                     "pytorch_s": round(t_theirs, 4), "ratio_ours_over_pytorch": round(t_ours / t_theirs, 3)})
        print(json.dumps(rows[-1]), flush=True)
    print("| config | vocab | ours s/step | PyTorch s/step | ours/PyTorch (goal <= 1.0) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| ({r['config']}) | {r['vocab_size']} | {r['ours_s']} | {r['pytorch_s']} | {r['ratio_ours_over_pytorch']} |")


if __name__ == "__main__":
    main()

"""`python -m m11b_jax.generate`: continue prompts with greedy search, sampling or beam search.

    python -m m11b_jax.generate --path CKPT [--bpe-dir DIR] [--input FILE|-] [--prompt-ids]
        [--max-new-tokens N] [--sampling --temperature T --top-k K --top-p P --seed S] [--beam N --lenpen L]
        [--batch-size B] [--model-parallel-size N] [--dtype float32|bfloat16] [--json]
    python -m m11b_jax.generate --compile-only --arch transformer_lm_megatron_11b [--model-parallel-size 8]
        [--dtype bfloat16] [--batch-size 8] [--cache-len 1024] [--target h100|v5e-8|...]

One prompt per input line. Text prompts are GPT-2 BPE-encoded, mapped through the checkpoint's dict.txt and
prefixed with `</s>`; with --prompt-ids each line is whitespace-separated dictionary ids, used exactly as given.
Output: the continuation's text per prompt, one line each (newlines escaped as \\n); with --json one object per
line, in input order: {"prompt_ids": [...], "tokens": [new ids, ending with 2 if </s> was produced],
"text": the continuation or null, "logprob": sum of the new tokens' natural-log probabilities}.
The rules are fairseq's SequenceGenerator's (m11b_jax.generation).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Sequence

from m11b_jax.errors import UserError, cli_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m m11b_jax.generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", help="checkpoint directory (python -m m11b_jax.convert output, or a training --save-dir)")
    p.add_argument("--bpe-dir", help="folder with encoder.json and vocab.bpe (default: the checkpoint's own)")
    p.add_argument("--input", default="-", help="prompts, one per line (default: standard input)")
    p.add_argument("--prompt-ids", action="store_true", help="input lines are dictionary ids, used as given")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per prompt at most (default %(default)s)")
    p.add_argument("--sampling", action="store_true", help="sample instead of the most likely token")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", "--sampling-topk", type=int, default=0, help="sample among the k most likely (0: all)")
    p.add_argument("--top-p", "--sampling-topp", type=float, default=1.0, help="sample from the top-p nucleus")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same output on any mesh")
    p.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    p.add_argument("--lenpen", type=float, default=1.0, help="beam ranking: sum log-prob / length^lenpen")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default %(default)s; with "
                   "--compile-only --target SLICE: per data-parallel replica)")
    p.add_argument("--model-parallel-size", type=int, default=None,
                   help="devices each layer is split over (default: as many as the devices and the model allow)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    aot = p.add_argument_group("compile-only: the decode step at full size, nothing allocated")
    aot.add_argument("--compile-only", action="store_true")
    aot.add_argument("--arch", default="transformer_lm_megatron_11b", help="config name in configs/ or a JSON path")
    aot.add_argument("--cache-len", type=int, default=1024, help="cache columns (default %(default)s)")
    aot.add_argument("--target", help="compile for this GPU (h100, h200, a100; needs the cuda-aot extra) or whole TPU "
                                      "slice (v4-8 ... v6e-8, see m11b_jax.targets; needs the tpu-aot extra) instead "
                                      "of this host's devices")
    return p


def read_prompts(path: str, as_ids: bool) -> list:
    from m11b_jax.textio import iter_lines

    lines = list(iter_lines(path))  # '-': standard input
    prompts = []
    for n, line in enumerate(lines, 1):
        if as_ids:
            try:
                prompts.append([int(t) for t in line.split()])
            except ValueError:
                raise UserError(f"--prompt-ids: line {n} is not whitespace-separated integers: {line[:40]!r}") from None
        else:
            prompts.append(line)
    if not prompts:
        raise UserError("no prompts: give one per line on standard input or in --input FILE")
    return prompts


def compile_only_report(cfg, mesh, *, batch_size: int, cache_len: int) -> dict:
    """Lower and compile one decode step (one token per row, cache of `cache_len` columns) from abstract params
    and an abstract cache: per-device memory and collectives, nothing allocated."""
    import jax
    import jax.numpy as jnp

    from m11b_jax import param_tree, sharding
    from m11b_jax.aot import bytes_per_device, collectives, memory
    from m11b_jax.generation import Generator

    rules = sharding.logical_rules()
    abstract = param_tree.abstract_params(cfg, mesh, rules)
    gen = Generator(cfg, abstract, mesh, rules)
    shardings, shapes = gen.cache_shardings(batch_size, cache_len)
    cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    tokens = jax.ShapeDtypeStruct((batch_size, 1), jnp.int32, sharding=sharding.batch_sharding(mesh, 2, rules=rules))
    t0 = time.perf_counter()
    with sharding.activate(mesh, rules):
        step = jax.jit(gen._apply, donate_argnums=(1,))
        compiled = step.lower(abstract, cache, tokens).compile()
    split = collectives(compiled.as_text(), split_loops=True)
    return {
        "arch": cfg.name, "params": cfg.num_params(), "mesh": sharding.describe(mesh),
        "param_dtype": cfg.param_dtype, "compute_dtype": cfg.compute_dtype,
        "batch_size": batch_size, "cache_len": cache_len,
        "param_bytes_per_device": bytes_per_device(abstract), "cache_bytes_per_device": bytes_per_device(cache),
        "per_device_bytes": memory(compiled),
        "collectives": {k: v for k, v in collectives(compiled.as_text()).items() if v["count"]},
        "layer_body_collectives": [{k: v for k, v in body.items() if v["count"]}
                                   for body in split["loop_bodies"].values() if any(v["count"] for v in body.values())],
        "compile_s": round(time.perf_counter() - t0, 2),
    }


def _compile_only(args) -> None:
    from m11b_jax import aot
    from m11b_jax.config import load_config

    mp = args.model_parallel_size or 1
    cfg = load_config(args.arch).replace(param_dtype=args.dtype, compute_dtype=args.dtype, dropout=0.0,
                                         attention_dropout=0.0)
    cfg.validate(mp)
    if args.cache_len > cfg.max_positions:
        raise UserError(f"--cache-len {args.cache_len} exceeds the model's {cfg.max_positions} positions")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be >= 1")
    # A TPU slice compiles whole: --batch-size rows per data-parallel replica of --model-parallel-size chips.
    mesh = aot.compile_only_mesh(args.target, mp)
    batch = args.batch_size * mesh.shape["data"]
    report = compile_only_report(cfg, mesh, batch_size=batch, cache_len=args.cache_len)
    report["target"] = mesh.devices.flat[0].platform
    print(json.dumps(aot.add_target_headroom(report, args.target), indent=2))


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.compile_only:
        return _compile_only(args)
    if args.path is None:
        raise UserError("give --path CKPT (or --compile-only --arch NAME)")
    from m11b_jax.generation import SearchOptions

    opts = SearchOptions(max_new_tokens=args.max_new_tokens, sampling=args.sampling, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, beam=args.beam,
                         lenpen=args.lenpen).validate()
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be >= 1")
    prompts = read_prompts(args.input, args.prompt_ids)
    from m11b_jax.api import LanguageModel

    lm = LanguageModel.load(args.path, model_parallel_size=args.model_parallel_size, dtype=args.dtype,
                            bpe_dir=args.bpe_dir)
    if not args.prompt_ids:
        lm._need_text()
    results = lm.generate(prompts, max_new_tokens=opts.max_new_tokens, sampling=opts.sampling,
                          temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, seed=opts.seed,
                          beam=opts.beam, lenpen=opts.lenpen, batch_size=args.batch_size, return_ids=True)
    has_text = lm.bpe is not None and lm.dictionary is not None
    for r in results:
        text = lm.decode(r.tokens) if has_text else None
        if args.json:
            print(json.dumps({"prompt_ids": r.prompt_ids, "tokens": r.tokens, "text": text,
                              "logprob": r.logprob}))
        else:
            print((text if text is not None else " ".join(map(str, r.tokens))).replace("\n", "\\n"))


if __name__ == "__main__":
    main()

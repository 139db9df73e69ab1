"""`python -m m11b_jax.train`: train a Megatron-11b-family LM with fairseq-train's flags.

fairseq's training command for Megatron-11b works as written with `fairseq-train` replaced by
`python -m m11b_jax.train`. Flags keep fairseq's names, meanings and defaults; a flag we do not implement
is an error naming it. With no DATA_PATH (and no --arch other than `tiny`) the command trains the `tiny`
model on the offline corpus (`corpus.ensure_offline_corpus`) with settings that finish in minutes on a CPU.
`--compile-only` compiles the full train step ahead of time on simulated CPU devices and prints a JSON
memory/collectives report instead of training.

This module turns the command line into a `RunConfig` (every check that needs no data or devices runs here,
with one-line errors) and sets up the process (simulated CPU devices, several hosts); `trainer.train` runs
the loop.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import math
import os
import sys
import textwrap
from typing import Sequence

from m11b_jax.config import ATTENTION_IMPLS, LOSS_IMPLS, LR_SCHEDULERS, REMAT_POLICIES, WEIGHT_GRAD_IMPLS
from m11b_jax.targets import GPU_COMPILER_SETTINGS
from m11b_jax.errors import UserError, cli_main
from m11b_jax.fairseq_archs import FAIRSEQ_ARCHS

MEGATRON_ARCH = "transformer_lm_megatron_11b"
# Simulated CPU devices when no accelerator is present: one (what a CPU user expects: --batch-size blocks per update)
# unless --distributed-world-size asks for more. --compile-only measures the 8-device step by default, and the
# offline default run keeps its (data 4 x model 2) mesh through OFFLINE_DEFAULTS.
DEFAULT_CPU_DEVICES = 1
COMPILE_ONLY_DEVICES = 8

# `python -m m11b_jax.train` with no DATA_PATH: the tiny model on the offline corpus, ~2 minutes on 2 CPU cores.
# Only flags the user did not give take these values.
OFFLINE_DEFAULTS = dict(
    arch="tiny",
    distributed_world_size=8,
    model_parallel_size=2,
    batch_size=4,
    batch_size_valid=16,
    tokens_per_sample=128,
    max_update=200,
    lr="0.002",
    warmup_updates=30,
    adam_betas="(0.9, 0.98)",
    weight_decay=0.01,
    clip_norm=1.0,
    log_interval=20,
    validate_interval_updates=100,
    save_interval_updates=100,
    keep_interval_updates=2,
    save_dir=os.path.join("checkpoints", "offline_tiny"),
)

DTYPE_HELP = (
    "As in fairseq. Default: fp32 parameters, Adam state and compute. --fp16: fp16 matmuls and activations, fp32 "
    "master parameters and Adam state, fairseq's dynamic loss scaling. --bf16: the same in bfloat16, no loss "
    "scaling. --memory-efficient-fp16 / --memory-efficient-bf16: parameters stored in 16 bits (no fp32 copy), "
    "Adam moments in fp32, the update computed in fp32 and cast back. LayerNorm, softmax, GELU and the loss run "
    "in fp32 under every policy."
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str):  # noqa: D401
        raise UserError(f"{message} (see python -m m11b_jax.train --help)")


def _str_list(kind, flag: str):
    """fairseq list flags (`--lr 0.1,0.2`, `--update-freq 2`): we support one value."""

    def parse(text: str):
        try:
            values = [kind(v) for v in str(text).replace("[", "").replace("]", "").split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if len(values) != 1:
            raise argparse.ArgumentTypeError(
                f"{flag} {text!r}: per-epoch lists are not supported, give one value")
        return values[0]

    parse.__name__ = kind.__name__
    return parse


def _betas(text: str) -> tuple[float, float]:
    try:
        value = ast.literal_eval(text)
        b1, b2 = (float(v) for v in value)
    except (ValueError, SyntaxError, TypeError):
        raise argparse.ArgumentTypeError(f"--adam-betas {text!r} must look like '(0.9, 0.98)'") from None
    return b1, b2


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m m11b_jax.train", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train fairseq's transformer_lm (Megatron-11b and smaller configs) in JAX with fairseq-train's "
                    "flags. With no DATA_PATH: trains the tiny model on the offline corpus.",
        epilog="Example (the Megatron-11b recipe on 8 devices):\n"
               "  python -m m11b_jax.train DATA_BIN --distributed-world-size 8 --memory-efficient-fp16 "
               "--num-workers 2 \\\n    --model-parallel-size 8 --criterion vocab_parallel_cross_entropy "
               "--task language_modeling \\\n    --sample-break-mode none --tokens-per-sample 1024 --arch "
               f"{MEGATRON_ARCH} \\\n    --share-decoder-input-output-embed --optimizer adam --adam-betas "
               "'(0.9, 0.98)' --adam-eps 1e-08 \\\n    --clip-norm 0.0 --lr-scheduler inverse_sqrt --lr 0.00015 "
               "--warmup-updates 3000 --weight-decay 0.01 \\\n    --dropout 0.1 --attention-dropout 0.1 "
               "--max-sentences 2 --max-update 300000\n")
    p.add_argument("data", nargs="?", metavar="DATA_PATH",
                   help="fairseq data-bin (dict.txt + SPLIT.bin/.idx). Omitted: the offline corpus and the tiny model")

    g = p.add_argument_group("model")
    g.add_argument("--arch", help=f"config name in configs/ ({MEGATRON_ARCH}, tiny, megatron_1p3b), a config JSON path, "
                                  f"or a fairseq arch ({', '.join(FAIRSEQ_ARCHS)}; see m11b_jax/fairseq_archs.py)")
    for flag, what in (("--decoder-embed-dim", "d_model"), ("--decoder-ffn-embed-dim", "FFN width"),
                       ("--decoder-layers", "layers"), ("--decoder-attention-heads", "attention heads")):
        g.add_argument(flag, type=int, help=f"{what}, overriding the arch's (fairseq's flag)")
    g.add_argument("--activation-fn", choices=("gelu", "relu"),
                   help="gelu (every arch but transformer_lm uses it); relu is refused: the model computes GELU")
    g.add_argument("--dropout", type=float, help="dropout (default: the arch's, 0.1 for the release)")
    g.add_argument("--attention-dropout", type=float, help="attention dropout (default: the arch's)")
    g.add_argument("--share-decoder-input-output-embed", action="store_true",
                   help="tie input and output embeddings; the model always ties them, and the release was trained "
                        f"tied, so {MEGATRON_ARCH} requires this flag")
    g.add_argument("--remat-policy", choices=REMAT_POLICIES,
                   help="what each layer keeps for the backward pass (default: the arch's; full recomputes the layer)")
    g.add_argument("--attention-impl", choices=ATTENTION_IMPLS,
                   help="attention core: autodiff (default) or manual, a hand-written backward that is faster on "
                        "CPUs (use with --remat-policy none; same function)")
    g.add_argument("--loss-impl", choices=LOSS_IMPLS,
                   help="output projection + loss: logits (default; the vocab-parallel loss) or fused, one operation "
                        "whose backward never forms the gradient of the logits (--model-parallel-size 1 only; "
                        "same function)")
    g.add_argument("--weight-grad-impl", choices=WEIGHT_GRAD_IMPLS,
                   help="weight gradients of the projections: flat (default) or transposed, the form XLA:CPU runs "
                        "fastest (CPU runs; not with the save_dots remat policies; same gradients)")

    g = p.add_argument_group("task and data")
    g.add_argument("--task", default="language_modeling", choices=("language_modeling",))
    g.add_argument("--sample-break-mode", default="none", choices=("none",),
                   help="none: the stream is cut in --tokens-per-sample blocks across line boundaries")
    g.add_argument("--tokens-per-sample", type=int, help="tokens per block (default: 1024, or the arch's max positions if fewer)")
    g.add_argument("--batch-size", "--max-sentences", dest="batch_size", type=int,
                   help="blocks per data-parallel replica per micro-batch; global batch = this x (devices / model-parallel size)")
    g.add_argument("--max-tokens", type=int,
                   help="token budget per batch per data-parallel replica: blocks = fairseq's batch_by_size with "
                        "full blocks (floor(max_tokens / tokens_per_sample), rounded down to a multiple of "
                        "--required-batch-size-multiple when >= it)")
    g.add_argument("--required-batch-size-multiple", type=int, default=8,
                   help="fairseq's rounding of full batches of >= this many blocks (default %(default)s)")
    g.add_argument("--batch-size-valid", "--max-sentences-valid", dest="batch_size_valid", type=int,
                   help="validation blocks per replica (default: the training batch)")
    g.add_argument("--update-freq", type=_str_list(int, "--update-freq"), default=1,
                   help="accumulate gradients of N micro-batches per update (inside the jitted step)")
    g.add_argument("--train-subset", default="train")
    g.add_argument("--valid-subset", default="valid", help="comma-separated validation splits")
    g.add_argument("--disable-validation", action="store_true")
    g.add_argument("--num-workers", type=int, default=1,
                   help="N > 0: a background thread prepares N updates' batches ahead; 0: in the loop")
    g.add_argument("--seed", type=int, default=1, help="initialization, data order and dropout (keys = seed, update)")
    g.add_argument("--gpu-compiler-settings", choices=tuple(GPU_COMPILER_SETTINGS), default="default",
                   help="named XLA:GPU compiler options for the train step (m11b_jax/targets.py); ignored off GPUs")
    g.add_argument("--dropout-rng", choices=("auto", "threefry2x32", "rbg"), default="auto",
                   help="dropout mask generator: threefry2x32 gives the same masks on any mesh and backend; rbg "
                        "(XLA's RngBitGenerator) is much cheaper on GPUs and deterministic for a given program. "
                        "auto: rbg on GPUs, threefry2x32 elsewhere")

    g = p.add_argument_group("optimization")
    g.add_argument("--max-update", type=int, default=0, help="stop after this many updates (0: no limit)")
    g.add_argument("--optimizer", default="adam", choices=("adam",))
    g.add_argument("--adam-betas", type=_betas, default="(0.9, 0.999)")
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--weight-decay", "--wd", dest="weight_decay", type=float, default=0.0,
                   help="decoupled weight decay on every parameter (fairseq Adam)")
    g.add_argument("--clip-norm", type=float, default=0.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--lr", type=_str_list(float, "--lr"), default=0.25, help="peak learning rate")
    g.add_argument("--lr-scheduler", default="inverse_sqrt", choices=LR_SCHEDULERS,
                   help="inverse_sqrt (default here) or fixed (fairseq's default: --lr throughout, after an optional "
                        "linear warmup; no per-epoch annealing)")
    g.add_argument("--warmup-updates", type=int,
                   help="linear warmup updates (default: 4000 with inverse_sqrt, 0 with fixed, as in fairseq)")
    g.add_argument("--warmup-init-lr", type=float, default=-1.0, help="lr of the first update (default 0 with warmup)")
    g.add_argument("--criterion", default="cross_entropy", choices=("cross_entropy", "vocab_parallel_cross_entropy"),
                   help="both compute the same loss; the vocab-parallel one never gathers the logits")

    g = p.add_argument_group("precision", textwrap.fill(DTYPE_HELP, 100))
    g.add_argument("--fp16", action="store_true", help="fp16 compute, fp32 master params and Adam, loss scaling")
    g.add_argument("--memory-efficient-fp16", action="store_true",
                   help="fp16 params and compute, fp32 Adam moments, loss scaling")
    g.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 params and Adam")
    g.add_argument("--memory-efficient-bf16", action="store_true", help="bf16 params and compute, fp32 Adam moments")
    g.add_argument("--fp16-init-scale", type=float, default=128.0, help="initial loss scale (fp16 flags)")
    g.add_argument("--fp16-scale-window", type=int,
                   help="double the loss scale after this many updates without an overflow (default: "
                        "2^14 / data-parallel size / --update-freq)")
    g.add_argument("--fp16-scale-tolerance", type=float, default=0.0,
                   help="share of overflowing updates since the last rescale tolerated before lowering the scale")
    g.add_argument("--threshold-loss-scale", type=float, help="never lower the loss scale below this")
    g.add_argument("--min-loss-scale", type=float, default=1e-4,
                   help="stop training when the loss scale would reach this (the loss is exploding)")

    g = p.add_argument_group("parallelism and hosts")
    g.add_argument("--model-parallel-size", type=int, default=1, help="devices per model (the mesh's model axis)")
    g.add_argument("--distributed-world-size", type=int,
                   help="total devices across hosts (default: all). On CPU: the number of simulated devices "
                        f"(default {DEFAULT_CPU_DEVICES})")
    g.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="split the residual stream's tokens over the model axis between tensor-parallel regions "
                        "(Megatron-SP; less activation memory). Default: on when --model-parallel-size > 1 and it "
                        "divides --tokens-per-sample")
    g.add_argument("--coordinator-address", help="HOST:PORT of process 0 (or JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, help="number of processes (or JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="this process's index (or JAX_PROCESS_ID)")
    g.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() and let JAX detect the cluster (e.g. a TPU pod slice); "
                        "SLURM, Open MPI and explicit coordinators are detected without it")
    g.add_argument("--fsdp", action="store_true",
                   help="also split every weight and its Adam state over the data axis (ZeRO-3 style: each layer's "
                        "weights are all-gathered as the layer runs, gradients reduced back to their shards); "
                        "for chips too small for the model axis alone (e.g. 16 GB TPU v5e)")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even if an accelerator is present")

    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save-dir", default="checkpoints")
    g.add_argument("--save-interval-updates", type=int, default=0, help="save (and validate) every N updates")
    g.add_argument("--keep-interval-updates", type=int, default=-1, help="keep the last N checkpoints (-1: all)")
    g.add_argument("--no-save", action="store_true", help="never write checkpoints")
    g.add_argument("--restore-file", default="checkpoint_last",
                   help="checkpoint_last (default): resume from the latest in --save-dir if any; or a checkpoint path")
    g.add_argument("--finetune-from-model",
                   help="start from converted parameters (python -m m11b_jax.convert) with fresh optimizer state; "
                        "ignored when --save-dir already holds a checkpoint. Without --arch, the model configuration "
                        "is the checkpoint's")
    g.add_argument("--validate-at-start", action="store_true", help="validate once before the first update")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--validate-interval-updates", type=int, default=0, help="validate every N updates (and at the end)")
    g.add_argument("--tensorboard-logdir", help="write TensorBoard scalars here (tensorboardX)")
    g.add_argument("--no-progress-bar", action="store_true")
    g.add_argument("--log-format", choices=("json", "simple", "tqdm", "none"),
                   help="console log lines: json (one JSON object per line), simple ('| train | ...' lines), tqdm "
                        "(those lines under a progress bar; the default) or none (no periodic lines)")

    g = p.add_argument_group("ahead-of-time check")
    g.add_argument("--compile-only", action="store_true",
                   help="compile the train step from abstract inputs (no weights allocated), print one JSON report, exit")
    g.add_argument("--device-memory-gb", type=float, default=None,
                   help="with --compile-only: fail when the step needs more than this (GiB) per device (default: a "
                        "TPU target's HBM per chip, 80 otherwise)")
    g.add_argument("--target", help="with --compile-only: compile for this GPU (h100, h200, a100, v100; needs "
                                    "pip install -e .[cuda-aot]) or whole TPU slice (v4-8, v4-16, v5e-8, v5e-16, "
                                    "v5p-8, v5p-16, v6e-8; needs pip install -e .[tpu-aot]) instead of CPUs")
    return p


@dataclasses.dataclass
class RunConfig:
    """Everything a run needs, resolved from the command line."""

    args: argparse.Namespace
    model: "object"  # config.ModelConfig
    optim: "object"  # train_step.OptimConfig
    data: str | None
    offline: bool
    tokens_per_sample: int
    batch_size: int
    batch_size_valid: int
    update_freq: int
    model_parallel_size: int
    sequence_parallel: bool
    dtype_policy: str
    fsdp: bool
    world_size: int | None
    validate_at_start: bool = False
    precision: str = "fp32"  # a precision.POLICIES name
    loss_scale: "object" = None  # precision.LossScaleConfig for the fp16 policies (scale_window None: default)
    batch_from: str = ""  # how batch_size was derived, for the start-up summary


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    by_flag = {s: a.dest for a in parser._actions for s in a.option_strings}
    return {by_flag[tok.split("=", 1)[0]] for tok in argv if tok.split("=", 1)[0] in by_flag}


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
    """Command line -> RunConfig, with every check that needs neither data nor devices."""
    from m11b_jax import precision as P
    from m11b_jax.train_step import OptimConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
    if flags:
        raise UserError(f"unsupported flag{'s' if len(flags) > 1 else ''} {', '.join(flags)}: m11b_jax.train does not "
                        f"implement {'them' if len(flags) > 1 else 'it'} (see python -m m11b_jax.train --help for the "
                        "supported fairseq flags)")
    if unknown:
        raise UserError(f"unexpected argument{'s' if len(unknown) > 1 else ''} {' '.join(unknown)}: only one DATA_PATH "
                        "is taken (see --help)")

    offline = args.data is None and args.arch in (None, "tiny") and not args.compile_only
    if offline:
        given = _explicit_dests(parser, argv)
        for dest, value in OFFLINE_DEFAULTS.items():
            if dest not in given:
                setattr(args, dest, _typed(parser, dest, value))
    if args.arch is None and args.finetune_from_model and not offline:
        from m11b_jax.fsutil import resolve
        from m11b_jax.params_io import CONFIG_FILE

        stored = resolve(args.finetune_from_model) / CONFIG_FILE
        if not stored.is_file():
            raise UserError(f"--finetune-from-model {args.finetune_from_model} holds no {CONFIG_FILE} (not an m11b_jax "
                            "params checkpoint: convert fairseq shards with python -m m11b_jax.convert), so the model "
                            "cannot be taken from it: give --arch")
        args.arch = str(stored)  # the model configuration of the checkpoint; flags below still override it
    if args.arch is None:
        raise UserError("--arch is required with a DATA_PATH or --compile-only "
                        f"(e.g. --arch {MEGATRON_ARCH}, --arch tiny, or a config JSON)")
    # Training the release architecture untied would silently be a different model (ours always ties).
    # --compile-only measures the tied model either way (issue 2's report command omits the flag).
    if args.arch == MEGATRON_ARCH and not args.share_decoder_input_output_embed and not args.compile_only:
        raise UserError(f"{MEGATRON_ARCH} ties its input and output embeddings (the release was trained with them "
                        "shared): add --share-decoder-input-output-embed")
    if args.arch in FAIRSEQ_ARCHS and not args.share_decoder_input_output_embed and not args.compile_only:
        raise UserError(f"--arch {args.arch} without --share-decoder-input-output-embed has a separate output "
                        "embedding in fairseq; this model always ties them: add --share-decoder-input-output-embed")
    if args.activation_fn == "relu":
        raise UserError("--activation-fn relu is not implemented (the model computes GELU): use --activation-fn gelu")
    if args.warmup_updates is None:
        args.warmup_updates = 0 if args.lr_scheduler == "fixed" else 4000
    for flag, value, low in (("--model-parallel-size", args.model_parallel_size, 1), ("--update-freq", args.update_freq, 1),
                             ("--log-interval", args.log_interval, 1), ("--num-workers", args.num_workers, 0),
                             ("--max-update", args.max_update, 0), ("--warmup-updates", args.warmup_updates, 0),
                             ("--save-interval-updates", args.save_interval_updates, 0),
                             ("--validate-interval-updates", args.validate_interval_updates, 0),
                             ("--seed", args.seed, 0)):
        if value < low:
            raise UserError(f"{flag} {value} must be >= {low}")
    if args.distributed_world_size is not None and args.distributed_world_size < 1:
        raise UserError(f"--distributed-world-size {args.distributed_world_size} must be >= 1")
    if args.batch_size is None and args.max_tokens is None:
        raise UserError("--batch-size (--max-sentences) or --max-tokens is required: blocks (or tokens) per "
                        "data-parallel replica, e.g. --batch-size 8")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be >= 1")
    if args.batch_size_valid is not None and args.batch_size_valid < 1:
        raise UserError(f"--batch-size-valid {args.batch_size_valid} must be >= 1")
    for flag in ("lr", "clip_norm", "weight_decay", "adam_eps", "warmup_init_lr", "dropout", "attention_dropout",
                 "device_memory_gb"):
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{flag.replace('_', '-')} {value} is not a finite number: give a real value")
    if not all(math.isfinite(b) for b in args.adam_betas):
        raise UserError(f"--adam-betas {args.adam_betas} must be finite numbers")
    if args.lr < 0 or args.clip_norm < 0 or args.weight_decay < 0 or args.adam_eps <= 0:
        raise UserError("--lr, --clip-norm and --weight-decay must be >= 0 and --adam-eps > 0")
    if not all(0.0 <= b < 1.0 for b in args.adam_betas):
        raise UserError(f"--adam-betas {args.adam_betas} must both be in [0, 1)")
    if args.target and not args.compile_only:
        raise UserError("--target only applies to --compile-only (training runs on the devices present)")
    if args.target:
        from m11b_jax.targets import check_target

        check_target(args.target)
    if args.restore_file not in (None, "checkpoint_last", "checkpoint_last.pt") and args.finetune_from_model:
        raise UserError("give either --restore-file (continue a run) or --finetune-from-model (start from converted "
                        "weights), not both")

    precision = P.policy_from_flags(args.fp16, args.memory_efficient_fp16, args.bf16, args.memory_efficient_bf16)
    policy = P.POLICIES[precision]
    loss_scale = None
    if policy.loss_scaling:
        loss_scale = P.LossScaleConfig(init_scale=args.fp16_init_scale, scale_window=args.fp16_scale_window,
                                       tolerance=args.fp16_scale_tolerance, threshold=args.threshold_loss_scale,
                                       min_scale=args.min_loss_scale).validate()
    overrides = dict(dropout=args.dropout, attention_dropout=args.attention_dropout, remat_policy=args.remat_policy,
                     attention_impl=args.attention_impl, loss_impl=args.loss_impl,
                     weight_grad_impl=args.weight_grad_impl)
    if precision != "fp32":
        overrides.update(param_dtype=policy.param_dtype, compute_dtype=policy.compute_dtype)
    mp = args.model_parallel_size
    model = _model_config(args, overrides)
    tokens = args.tokens_per_sample if args.tokens_per_sample is not None else min(1024, model.max_positions)
    if tokens < 1:
        raise UserError(f"--tokens-per-sample {tokens} must be >= 1")
    model.validate(mp, tokens)
    batch_size, batch_from = _blocks_per_batch(args, tokens)
    sp = args.sequence_parallel
    if sp is None:
        sp = mp > 1 and tokens % mp == 0
    elif sp and tokens % mp:
        raise UserError(f"--sequence-parallel splits the {tokens} tokens of a block over {mp} devices: use a "
                        f"--tokens-per-sample divisible by {mp} or --no-sequence-parallel")
    optim = OptimConfig(lr=args.lr, betas=tuple(args.adam_betas), eps=args.adam_eps, weight_decay=args.weight_decay,
                        warmup_updates=args.warmup_updates, warmup_init_lr=args.warmup_init_lr, clip_norm=args.clip_norm,
                        lr_scheduler=args.lr_scheduler)
    return RunConfig(args=args, model=model, optim=optim, data=args.data, offline=offline, tokens_per_sample=tokens,
                     batch_size=batch_size, batch_size_valid=args.batch_size_valid or batch_size,
                     update_freq=args.update_freq, model_parallel_size=mp, sequence_parallel=sp,
                     dtype_policy=P.describe(precision), fsdp=args.fsdp, world_size=args.distributed_world_size,
                     validate_at_start=offline or args.validate_at_start, precision=precision, loss_scale=loss_scale,
                     batch_from=batch_from)



def _model_config(args, overrides: dict):
    """--arch (a configs/ name, a JSON path, or a fairseq arch) with the size flags and policy flags applied."""
    from m11b_jax import fairseq_archs as FA
    from m11b_jax.config import CONFIG_DIR, load_config

    sizes = {k: getattr(args, k) for k in FA.SIZE_FLAGS}
    if args.arch in FA.FAIRSEQ_ARCHS and not (CONFIG_DIR / f"{args.arch}.json").is_file():
        num_symbols = _dictionary_size(args.data) if args.data else None
        tokens = args.tokens_per_sample if args.tokens_per_sample is not None else 1024
        model = FA.registry_config(args.arch, num_symbols=num_symbols, tokens_per_sample=tokens,
                                   model_parallel_size=args.model_parallel_size, activation_fn=args.activation_fn)
        model = model.replace(**{k: v for k, v in overrides.items() if v is not None})
    else:
        model = load_config(args.arch, **overrides)
    return FA.apply_size_flags(model, sizes)


def _dictionary_size(data: str) -> int | None:
    """len(dictionary) of DATA_PATH/dict.txt (None when absent: the trainer reports that with the data)."""
    import pathlib

    from m11b_jax.dictionary import Dictionary

    path = pathlib.Path(data) / "dict.txt"
    return len(Dictionary.load(path)) if path.is_file() else None


def _blocks_per_batch(args, tokens: int) -> tuple[int, str]:
    """(blocks per data-parallel replica, how that was derived): fairseq's batch_by_size rule."""
    from m11b_jax.train_data import fairseq_blocks_per_batch

    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens} must be >= 1")
    n = fairseq_blocks_per_batch(args.max_tokens, tokens, args.batch_size, args.required_batch_size_multiple)
    parts = [f"--max-tokens {args.max_tokens}"] if args.max_tokens is not None else []
    parts += [f"--batch-size {args.batch_size}"] if args.batch_size is not None else []
    how = " and ".join(parts)
    fit = min(x for x in (args.batch_size, args.max_tokens // tokens if args.max_tokens else None) if x is not None)
    if n != fit:
        how += f" ({fit} fit, rounded down to a multiple of --required-batch-size-multiple {args.required_batch_size_multiple} as fairseq does)"
    return n, how


def _typed(parser: argparse.ArgumentParser, dest: str, value):
    """A default given as the command line would give it, converted by the flag's own type."""
    action = next(a for a in parser._actions if a.dest == dest)
    return action.type(value) if action.type is not None and isinstance(value, str) else value


def setup_process(run: RunConfig) -> None:
    """Platform, simulated CPU devices and multi-host initialization: before any JAX computation."""
    from m11b_jax import runtime

    a = run.args
    if a.compile_only or a.cpu:
        runtime.force_cpu_platform()
    if not a.compile_only:
        runtime.maybe_initialize_distributed(a.coordinator_address, a.num_processes, a.process_id, force=a.multihost)
    nproc = _num_processes()
    if run.world_size is None and not a.compile_only and (runtime.backends_initialized() or cpu_devices_set()):
        return  # JAX already runs, or the process chose its CPU device count (e.g. a test): keep it
    world = run.world_size or (COMPILE_ONLY_DEVICES if a.compile_only else DEFAULT_CPU_DEVICES * nproc)
    if world % nproc:
        raise UserError(f"--distributed-world-size {world} is not divisible by the {nproc} processes: give each "
                        "host the same number of devices")
    # Only the CPU backend reads this: with no accelerator the run uses `world` simulated devices.
    runtime.configure_cpu_devices(world // nproc)


def cpu_devices_set() -> bool:
    """Whether this process already asked JAX for a number of CPU devices (jax_num_cpu_devices, default -1)."""
    import jax

    return jax.config.jax_num_cpu_devices > 0


def _num_processes() -> int:
    try:
        from jax._src.distributed import global_state

        return int(global_state.num_processes or 1) if global_state.client is not None else 1
    except Exception:
        return 1


def check_world_size(run: RunConfig) -> None:
    import jax

    if run.world_size is not None and run.world_size != jax.device_count():
        raise UserError(f"--distributed-world-size {run.world_size} but {jax.device_count()} {jax.default_backend()} "
                        f"devices are present: pass --distributed-world-size {jax.device_count()} or omit it")
    mp, n = run.model_parallel_size, jax.device_count()
    if run.world_size is None and n % mp and jax.default_backend() == "cpu":
        raise UserError(f"--model-parallel-size {mp} needs a multiple of {mp} devices; this CPU run has {n} simulated "
                        f"device(s) (default {DEFAULT_CPU_DEVICES}): add --distributed-world-size {mp}")


def compile_only(run: RunConfig) -> dict:
    """Build and compile the full train step from abstract inputs; return the report (printed by main)."""
    import jax

    from m11b_jax import aot, targets

    a = run.args
    if targets.is_tpu(a.target):  # the slice's own chip count (--distributed-world-size must agree)
        mesh = aot.target_mesh(a.target, run.world_size, run.model_parallel_size)
        return _compile_report(run, mesh, targets.memory_bytes(a.target) / 2**30)
    n = run.world_size or COMPILE_ONLY_DEVICES
    if a.target and importlib.util.find_spec("jax_cuda12_plugin") is None:
        raise UserError(f"--target {a.target} compiles with JAX's CUDA plugin, which is not installed: "
                        "pip install -e .[cuda-aot]")
    if not a.target and jax.device_count() < n:
        raise UserError(f"--compile-only needs {n} CPU devices but this process has {jax.device_count()}: "
                        "run it in a fresh process")
    mesh = aot.target_mesh(a.target, n, run.model_parallel_size)  # target None: this process's (CPU) devices
    return _compile_report(run, mesh, 80.0)


def _compile_report(run: RunConfig, mesh, default_memory_gb: float) -> dict:
    from m11b_jax import aot

    a = run.args
    if a.device_memory_gb is None:
        a.device_memory_gb = default_memory_gb
    report = aot.compile_report(run.model, mesh, batch_size=run.batch_size, tokens_per_sample=run.tokens_per_sample,
                                update_freq=run.update_freq, sequence_parallel=run.sequence_parallel, ocfg=run.optim,
                                target=a.target, criterion=a.criterion,
                                loss_scale=_resolved_loss_scale(run, mesh), fsdp=run.fsdp)
    report["dtype_policy"] = run.dtype_policy
    report["device_memory_gb"] = a.device_memory_gb
    report["fits"] = report["per_device_bytes"]["total"] <= a.device_memory_gb * 2**30
    report["headroom_fraction"] = round(1 - report["per_device_bytes"]["total"] / (a.device_memory_gb * 2**30), 4)
    return report


def _resolved_loss_scale(run: RunConfig, mesh):
    """The run's loss scaler with fairseq's default window for this mesh's data-parallel size (None: no scaling)."""
    if run.loss_scale is None:
        return None
    return run.loss_scale.with_window(mesh.shape["data"], run.update_freq)


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse, set up, then compile-only or train. Returns a summary dict (also used by tests)."""
    cfg = parse_args(argv)
    setup_process(cfg)
    if cfg.args.compile_only:
        from m11b_jax import aot

        report = compile_only(cfg)
        print(aot.dumps(report), flush=True)
        aot.check_fits(report, cfg.args.device_memory_gb)
        return {"report": report}
    check_world_size(cfg)
    from m11b_jax.trainer import train

    return train(cfg)


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m m11b_jax.eval_lm`: language-model perplexity with fairseq-eval-lm's `--context-window` rule.

    python -m m11b_jax.eval_lm DATA_BIN --path CKPT [--gen-subset test] [--tokens-per-sample 1024]
        [--context-window 992] [--batch-size 8] [--model-parallel-size N] [--dtype float32|bfloat16]
        [--orig-token-count N | --orig-tokens-file wiki.test.tokens] [--output-token-logprobs FILE.npy] [--json]
    python -m m11b_jax.eval_lm --compile-only --arch transformer_lm_megatron_11b [--model-parallel-size 8]
        [--dtype float32|bfloat16] [--batch-size B] [--target h100]

fairseq-eval-lm's command for the release works as written (plus `--cpu` on a machine without GPUs):
    python -m m11b_jax.eval_lm DATA_BIN --task language_modeling --criterion cross_entropy --distributed-world-size 8
        --model-parallel-size 8 --batch-size 8 --gen-subset test --context-window 992 --path megatron_11b/model.pt
`--path DIR/model.pt` names fairseq's shards DIR/model-model_part-{r}.pt (+ DIR/dict.txt): they are read with the
converter's safe loader, one at a time, straight onto the mesh (`convert.load_fairseq_onto_mesh`). fairseq flags
that change nothing here are accepted with a note (NOOP_FLAGS); those that would change the results and are not
implemented are refused by name (REFUSED_FLAGS).

The scoring rule (fairseq `eval_lm` + `LMContextWindowDataset`, as ../shared/REFERENCE.md states it):
the split's tokens, all lines back to back, are one stream t0 t1 ... t(N-1); the model's inputs are that
stream shifted right by one with `</s>` first, inputs = [eos, t0, t1, ...]. Targets are cut into blocks
of `block = tokens_per_sample - context_window` tokens; block b (targets s = b*block .. e-1) is scored
by ONE forward pass over inputs[max(0, s - context_window) : e], of which only its own targets count.
Positions restart at 2 in every window, the first blocks see less (or no) context, every token
(`</s>` included) is scored exactly once. Loss is reported in base 2, ppl = 2^loss; tokens scored
-inf (or +inf) are left out of the sum and the count, as fairseq does.

Normalized perplexity (the Megatron-11b README): 2^(log2(ppl) * ntokens / orig_token_count), where the
original count is Megatron's word count of the untokenized-BPE text (`--orig-tokens-file`).

Windows are batched (`--batch-size` per data-parallel replica, right padding with `<pad>`), the model is
laid out over a (data, model) mesh of all devices by `m11b_jax.sharding`'s table, and the step is
compiled once (the last batch is padded with empty windows). The forward pass is the model's own, with
scoring's options (`m11b_jax.score_step`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Sequence

import jax
import numpy as np

from m11b_jax import aot, sharding
from m11b_jax.config import load_config
from m11b_jax.detok import original_token_count as count_words
from m11b_jax.dictionary import Dictionary
from m11b_jax.errors import UserError, cli_main
from m11b_jax.indexed_dataset import MMapIndexedDataset, split_prefix
from m11b_jax.params_io import EVAL_DTYPES, eval_config, load_checkpoint
from m11b_jax.runtime import retain_host_memory_on_cpu
from m11b_jax.score_step import default_attention_chunk, default_passes, make_score_step, matmul_precision
from m11b_jax.textio import atomic_output

RELEASE_TOKENS_PER_SAMPLE, RELEASE_CONTEXT_WINDOW = 1024, 992


# ---- the scoring rule: which inputs each block of targets sees -----------------------------------


@dataclasses.dataclass(frozen=True)
class ContextWindows:
    """fairseq eval_lm's blocks and windows over a stream of `num_tokens` targets."""

    num_tokens: int
    tokens_per_sample: int
    context_window: int

    def __post_init__(self):
        if self.tokens_per_sample < 1:
            raise UserError(f"--tokens-per-sample {self.tokens_per_sample} must be >= 1")
        if not 0 <= self.context_window < self.tokens_per_sample:
            raise UserError(
                f"--context-window {self.context_window} must be >= 0 and smaller than --tokens-per-sample "
                f"{self.tokens_per_sample} (each window scores tokens_per_sample - context_window tokens): "
                f"lower --context-window, e.g. {RELEASE_CONTEXT_WINDOW} with {RELEASE_TOKENS_PER_SAMPLE}")
        if self.num_tokens < 1:
            raise UserError("the split holds no tokens: binarize a non-empty text file")

    @property
    def block(self) -> int:
        """Targets scored per window."""
        return self.tokens_per_sample - self.context_window

    @property
    def num_blocks(self) -> int:
        return -(-self.num_tokens // self.block)

    def bounds(self, block_ids: np.ndarray):
        """For each block: (window start a, first target s, end e); the window is inputs[a:e], targets t[s:e]."""
        s = np.asarray(block_ids, dtype=np.int64) * self.block
        e = np.minimum(s + self.block, self.num_tokens)
        a = np.maximum(s - self.context_window, 0)
        return a, s, e

    def batch(self, stream: np.ndarray, block_ids: np.ndarray, *, eos: int, pad: int):
        """Model inputs for `block_ids` (-1 = an empty padding row).

        Returns tokens [n, tokens_per_sample] (window inputs, right-padded with pad), first [n] (position of
        the block's first target inside the window) and targets [n, block] (pad where there is none).
        """
        block_ids = np.asarray(block_ids, dtype=np.int64)
        real = block_ids >= 0
        a, s, e = self.bounds(np.where(real, block_ids, 0))
        e = np.where(real, e, a)  # padding rows: an empty window
        n_last = self.num_tokens - 1
        idx = a[:, None] + np.arange(self.tokens_per_sample)[None, :]  # index into inputs = [eos] + stream
        shifted = np.asarray(stream[np.clip(idx - 1, 0, n_last)], dtype=np.int32)
        tokens = np.where(idx < e[:, None], np.where(idx == 0, eos, shifted), pad).astype(np.int32)
        tidx = s[:, None] + np.arange(self.block)[None, :]
        targets = np.where(tidx < e[:, None], np.asarray(stream[np.clip(tidx, 0, n_last)], dtype=np.int32), pad)
        return tokens, (s - a).astype(np.int32), targets.astype(np.int32)


# ---- results -------------------------------------------------------------------------------------


def normalized_ppl(ppl: float, ntokens: int, orig_token_count: int) -> float:
    """The Megatron-11b README's renormalization: 2^(log2(ppl) * ntokens / orig_token_count)."""
    if orig_token_count < 1:
        raise UserError(f"the original token count must be >= 1, got {orig_token_count}")
    return 2.0 ** (math.log2(ppl) * ntokens / orig_token_count)


@dataclasses.dataclass
class EvalResult:
    token_logprobs: np.ndarray  # natural-log probability of every token, in stream order (fp32)
    elapsed_s: float  # scoring time after compilation
    compile_s: float = 0.0

    @property
    def finite(self) -> np.ndarray:
        return np.isfinite(self.token_logprobs)

    @property
    def ntokens(self) -> int:
        return int(self.finite.sum())

    @property
    def loss_base2(self) -> float:
        lp = self.token_logprobs[self.finite].astype(np.float64)
        return float(-lp.sum() / max(lp.size, 1) / math.log(2))

    @property
    def ppl(self) -> float:
        return 2.0 ** self.loss_base2

    def summary(self, orig_token_count: int | None = None) -> dict:
        return {
            "ntokens": self.ntokens,
            "loss_base2": self.loss_base2,
            "ppl": self.ppl,
            "normalized_ppl": None if orig_token_count is None else normalized_ppl(self.ppl, self.ntokens,
                                                                                 orig_token_count),
            "orig_token_count": orig_token_count,
            "skipped_inf": int(self.token_logprobs.size - self.ntokens),
            "elapsed_s": self.elapsed_s,
            "tokens_per_s": self.token_logprobs.size / self.elapsed_s if self.elapsed_s > 0 else None,
            "compile_s": self.compile_s,
        }


# ---- scoring a stream -------------------------------------------------------------------------


def evaluate(params, cfg, stream: np.ndarray, windows: ContextWindows, mesh, rules, *, batch_size: int,
             attention_chunk: int | None = None, passes: int | None = None, eos: int = 2, log=None) -> EvalResult:
    """Score every token of `stream` by the rule; params must already be laid out on `mesh`.

    One process (all of the mesh's devices on this host): batches are placed with jax.device_put.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be >= 1")
    platform = mesh.devices.flat[0].platform
    chunk = attention_chunk or default_attention_chunk(platform)
    passes = passes or default_passes(platform, batch_size)
    if batch_size % passes:
        raise UserError(f"--batch-size {batch_size} is not a multiple of --passes {passes}")
    global_batch = batch_size * mesh.shape[sharding.DATA]
    rows, firsts = sharding.batch_sharding(mesh, 2, rules=rules), sharding.batch_sharding(mesh, 1, rules=rules)
    pad = cfg.pad_idx

    def batch_of(start: int):
        ids = np.arange(start, start + global_batch)
        ids[ids >= windows.num_blocks] = -1
        return ids, windows.batch(stream, ids, eos=eos, pad=pad)

    def put(arrays):
        tokens, first, targets = arrays
        return (jax.device_put(tokens, rows), jax.device_put(first, firsts), jax.device_put(targets, rows))

    t0 = time.perf_counter()
    with sharding.activate(mesh, rules), matmul_precision(cfg):
        ids, arrays = batch_of(0)
        compiled = make_score_step(cfg, mesh, rules, chunk, passes).lower(params, *put(arrays)).compile()
    compile_s = time.perf_counter() - t0

    out = np.full(windows.num_tokens, np.nan, dtype=np.float32)
    scored = np.zeros(windows.num_tokens, dtype=bool)

    def collect(ids, logprobs):
        real = ids >= 0
        _, s, e = windows.bounds(ids[real])
        tidx = s[:, None] + np.arange(windows.block)[None, :]
        keep = tidx < e[:, None]
        out[tidx[keep]] = np.asarray(logprobs)[real][keep]
        scored[tidx[keep]] = True

    start_time = last_log = time.perf_counter()
    pending = None
    for start in range(0, windows.num_blocks, global_batch):
        if start:
            ids, arrays = batch_of(start)
        result = compiled(params, *put(arrays))  # asynchronous: the next batch is built meanwhile
        if pending is not None:
            collect(*pending)
        pending = (ids, result)
        if log is not None and time.perf_counter() - last_log > 30:
            last_log = time.perf_counter()
            done = min(start * windows.block, windows.num_tokens)
            log(f"scored {done}/{windows.num_tokens} tokens ({done / (last_log - start_time):.0f} tokens/s)")
    collect(*pending)
    elapsed = time.perf_counter() - start_time
    if not scored.all():  # a bug of the window rule, never the user's; still no assert (python -O drops it)
        raise RuntimeError(f"token {int(np.argmin(scored))} of {windows.num_tokens} was not scored")
    check_finite_scores(out)
    return EvalResult(out, elapsed, compile_s)


def check_finite_scores(logprobs: np.ndarray) -> None:
    """A NaN log-probability (NaN weights, or an overflow in --dtype bfloat16) makes the perplexity meaningless:
    an error naming the first such token. -inf is a legitimate score, which fairseq (and we) skip."""
    nan = np.isnan(logprobs)
    if nan.any():
        first = int(np.argmax(nan))
        raise UserError(f"the model scored {int(nan.sum())} of {logprobs.size} tokens as NaN (the first at stream "
                        f"position {first}): its weights are not finite or overflow; check the checkpoint "
                        "(python -m m11b_jax.convert --verify) or evaluate with --dtype float32")


# ---- inputs: data-bin, dictionary, checkpoint ----------------------------------------------------


def load_split(data_bin: str | os.PathLike, split: str):
    """(dictionary, token stream) of DATA_BIN/{split}.bin/.idx, with one-line errors for what is missing."""
    data_bin = pathlib.Path(data_bin)
    if not data_bin.is_dir():
        raise UserError(f"data-bin {data_bin} is not a directory: binarize text with python -m m11b_jax.preprocess")
    prefix = split_prefix(data_bin, split, "pass --gen-subset with one of those, or binarize it (python -m "
                          f"m11b_jax.preprocess --only-source --testpref TEXT --srcdict dict.txt --destdir {data_bin})")
    dictionary = Dictionary.load(data_bin / "dict.txt")
    return dictionary, MMapIndexedDataset(prefix).tokens()


def check_dictionary(dictionary, stream: np.ndarray, cfg, ckpt_dict_path, data_bin) -> None:
    """The data must be indexed with the checkpoint's dictionary (`check_dictionary_fits`), every id < vocab."""
    check_dictionary_fits(dictionary, cfg.vocab_size, ckpt_dict_path, f"{data_bin}/dict.txt")
    top = int(stream.max()) if stream.size else 0
    if top >= cfg.vocab_size:
        raise UserError(f"{data_bin} holds token index {top} >= the vocabulary size {cfg.vocab_size}: "
                        "re-binarize it with the checkpoint's dict.txt")


def check_dictionary_fits(dictionary, vocab: int, ckpt_dict_path, where: str) -> None:
    """With a dict.txt stored in the checkpoint, `dictionary` must list the same symbols. Without one (a training
    checkpoint), it must fit inside the vocabulary, as training requires: fairseq's model-parallel models pad
    it to a multiple of 8 x model_parallel_size, and `train` accepts any dictionary up to the arch's vocab_size
    (the other rows are never a target).
    """
    n = len(dictionary)
    if ckpt_dict_path is not None:
        stored = Dictionary.load(ckpt_dict_path)
        if stored.symbols != dictionary.symbols:
            raise UserError(
                f"{where} ({n} symbols) is not the checkpoint's dictionary {ckpt_dict_path} "
                f"({len(stored)} symbols, vocabulary {vocab}): binarize the text with --srcdict {ckpt_dict_path} "
                "(python -m m11b_jax.preprocess)")
    elif n > vocab:
        raise UserError(
            f"{where} has {n} symbols but the checkpoint's vocabulary is only {vocab}: binarize the text "
            "with the dict.txt the model was trained with (python -m m11b_jax.preprocess --srcdict DICT)")


def checkpoint_vocabulary(path) -> tuple[int, pathlib.Path | None]:
    """(vocab_size, stored dict.txt or None) of a checkpoint, from its metadata alone (no weights read)."""
    from m11b_jax import checkpoint as train_ckpt
    from m11b_jax import params_io
    from m11b_jax.fsutil import resolve

    path = resolve(path)
    if path.is_dir() and (train_ckpt.is_step_dir(path) or train_ckpt.list_steps(path)):
        root, update = (path.parent, int(path.name)) if train_ckpt.is_step_dir(path) else (
            path, train_ckpt.list_steps(path)[-1])
        try:
            return int(train_ckpt.read_meta(root, update)["model_config"]["vocab_size"]), None
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{root / str(update)}: no usable model config in its metadata: the checkpoint is "
                            "damaged") from None
    return params_io.load_model_config(path).vocab_size, params_io.dictionary_path(path)


def original_token_count(args) -> int | None:
    if args.orig_token_count is not None:
        if args.orig_token_count < 1:
            raise UserError(f"--orig-token-count {args.orig_token_count} must be >= 1")
        return args.orig_token_count
    if args.orig_tokens_file is not None:
        if not os.path.isfile(args.orig_tokens_file):
            raise UserError(f"--orig-tokens-file {args.orig_tokens_file} not found: give the original "
                            "(tokenized) text, e.g. wikitext-103/wiki.test.tokens")
        return count_words(args.orig_tokens_file)
    return None


def save_token_logprobs(path: str | os.PathLike, logprobs: np.ndarray) -> None:
    """Write the per-token natural-log probabilities as .npy, all-or-nothing."""
    with atomic_output(path, "wb") as f:
        np.save(f, logprobs)


def check_output_path(path: str | os.PathLike | None) -> None:
    """Fail before a long evaluation, not after it, when the output folder does not exist."""
    if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"output folder of {path} does not exist: create it first")


# ---- command line --------------------------------------------------------------------------------


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The evaluation flags shared with `python -m m11b_jax.wikitext103`."""
    p.add_argument("--tokens-per-sample", type=int, default=RELEASE_TOKENS_PER_SAMPLE,
                   help="window length (default %(default)s, the release's)")
    p.add_argument("--context-window", type=int, default=RELEASE_CONTEXT_WINDOW,
                   help="tokens of context before each scored block (default %(default)s, as the release was "
                        "evaluated; fairseq-eval-lm's own default is 0)")
    p.add_argument("--batch-size", "--max-sentences", type=int, default=8,
                   help="windows per forward pass per data-parallel replica (default %(default)s)")
    p.add_argument("--model-parallel-size", type=int, default=1,
                   help="devices each layer is split over; the other factor of the device count is data parallel")
    p.add_argument("--dtype", choices=EVAL_DTYPES, default="float32",
                   help="parameters and matmuls (default float32, as the release was evaluated)")
    p.add_argument("--attention-chunk", type=int, default=None,
                   help="query positions per causal-attention block (default 64 on CPU, 256 otherwise)")
    p.add_argument("--passes", type=int, default=None,
                   help="score each batch in this many sequential passes (default: one window per pass on CPU, "
                        "where small temporaries are faster; 1 otherwise); results do not change")


# fairseq-eval-lm flags that change nothing here: accepted, with a note. flag: None (a switch), a type (any value),
# or a tuple of the values that change nothing.
NOOP_FLAGS = {"--task": ("language_modeling",), "--criterion": ("cross_entropy", "vocab_parallel_cross_entropy"),
              "--num-workers": int, "--seed": int,
              "--log-format": str, "--log-interval": int, "--quiet": None, "--max-tokens": int, "--softmax-batch": int,
              "--sample-break-mode": ("none",), "--bpe": str, "--tokenizer": str, "--ddp-backend": str,
              "--distributed-port": int, "--distributed-backend": str, "--required-batch-size-multiple": int}
# fairseq-eval-lm flags that would change the results and are not implemented: refused by name.
REFUSED_FLAGS = {"--fp16": "evaluates in fp16; use --dtype bfloat16 (or the default float32, as the release was "
                           "evaluated)",
                 "--memory-efficient-fp16": "evaluates in fp16; use --dtype bfloat16",
                 "--add-bos-token": "prepends <s> to every block", "--output-word-probs": "prints per-word scores; use "
                 "--output-token-logprobs FILE.npy", "--output-word-stats": "prints word statistics",
                 "--model-overrides": "changes the model's options", "--remove-bpe": "merges BPE pieces into words "
                 "before scoring", "--max-target-positions": "changes the model's positions"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - one line, no usage dump
        raise UserError(f"{message} (see python -m m11b_jax.eval_lm --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m m11b_jax.eval_lm", description=__doc__.split("\n")[0], allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", metavar="DATA_BIN", help="folder with dict.txt and SPLIT.bin/.idx")
    p.add_argument("--path", help="m11b_jax params checkpoint (python -m m11b_jax.convert writes one), or a "
                                  "training --save-dir / one of its update directories")
    p.add_argument("--gen-subset", default="test", help="split to score (default %(default)s)")
    add_eval_args(p)
    count = p.add_mutually_exclusive_group()
    count.add_argument("--orig-token-count", type=int, help="original token count for the normalized perplexity")
    count.add_argument("--orig-tokens-file", help="count the original tokens of this file (Megatron's convention: "
                                                  "len(text.strip().split(' ')))")
    p.add_argument("--output-token-logprobs", metavar="FILE.npy",
                   help="save each token's natural-log probability, in stream order")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if an accelerator is present")
    p.add_argument("--distributed-world-size", type=int,
                   help="devices to use (default: all present; on a CPU one simulated device unless this asks for more)")
    compile_only = p.add_argument_group("compile-only: per-device memory of the eval step at full size, nothing "
                                        "allocated")
    compile_only.add_argument("--compile-only", action="store_true")
    compile_only.add_argument("--arch", default="transformer_lm_megatron_11b",
                              help="config name in configs/ or a JSON path")
    compile_only.add_argument("--target", help="compile for this GPU (h100, h200, a100; no GPU needed, JAX's CUDA "
                                               "plugin is) or whole TPU slice (v4-8 ... v6e-8, see m11b_jax.targets; "
                                               "libtpu is: pip install -e .[tpu-aot]) instead of this host's devices")
    return p


def report_lines(summary: dict, split: str) -> list[str]:
    lines = [f"| {split}: evaluated {summary['ntokens']} tokens in {summary['elapsed_s']:.1f}s "
             f"({summary['tokens_per_s']:.2f} tokens/s; compiled in {summary['compile_s']:.1f}s)",
             f"| Loss (base 2): {summary['loss_base2']:.4f}, Perplexity: {summary['ppl']:.2f}"]
    if summary["skipped_inf"]:
        lines.append(f"| skipped {summary['skipped_inf']} tokens with infinite scores (as fairseq does)")
    if summary["normalized_ppl"] is not None:
        lines.append(f"| Normalized perplexity: {summary['normalized_ppl']:.2f} "
                     f"(2^(log2 ppl * {summary['ntokens']} / {summary['orig_token_count']}))")
    return lines


def run_eval(data_bin, path, *, split: str = "test", tokens_per_sample: int = RELEASE_TOKENS_PER_SAMPLE,
             context_window: int = RELEASE_CONTEXT_WINDOW, batch_size: int = 8, model_parallel_size: int = 1,
             dtype: str = "float32", attention_chunk: int | None = None, passes: int | None = None,
             orig_token_count: int | None = None,
             output_token_logprobs=None, devices=None, log=None) -> tuple[dict, EvalResult]:
    """Evaluate checkpoint `path` on DATA_BIN/split; returns (summary dict, EvalResult). The CLIs call this."""
    check_output_path(output_token_logprobs)
    dictionary, stream = load_split(data_bin, split)
    windows = ContextWindows(int(stream.size), tokens_per_sample, context_window)
    mesh = sharding.make_mesh(model_parallel_size, devices)
    retain_host_memory_on_cpu(mesh)
    rules = sharding.logical_rules()
    cfg, params, ckpt_dict = load_checkpoint(path, mesh, rules, dtype)
    cfg.validate(model_parallel_size, tokens_per_sample=tokens_per_sample)
    check_dictionary(dictionary, stream, cfg, ckpt_dict, data_bin)
    result = evaluate(params, cfg, stream, windows, mesh, rules, batch_size=batch_size,
                      attention_chunk=attention_chunk, passes=passes, eos=dictionary.eos(), log=log)
    if output_token_logprobs is not None:
        save_token_logprobs(output_token_logprobs, result.token_logprobs)
    return result.summary(orig_token_count), result


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None):
    """fairseq-eval-lm's command line: our flags, fairseq's no-op flags (noted), its unimplemented ones refused."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser().parse_known_args(argv)
    notes, i = [], 0
    while i < len(unknown):
        flag, _, inline = unknown[i].partition("=")
        if flag in REFUSED_FLAGS:
            raise UserError(f"{flag} is not implemented: fairseq {REFUSED_FLAGS[flag]}")
        if flag not in NOOP_FLAGS:
            raise UserError(f"unrecognized argument {unknown[i]} (see python -m m11b_jax.eval_lm --help)")
        kind = NOOP_FLAGS[flag]
        value = None
        if kind is not None and not inline:
            if i + 1 >= len(unknown):
                raise UserError(f"{flag} expects a value")
            i, value = i + 1, unknown[i + 1]
        value = inline or value
        if isinstance(kind, tuple) and value not in kind:
            raise UserError(f"{flag} {value} is not implemented: {flag} {' or '.join(kind)} is (fairseq's "
                            "language-model scoring)")
        notes.append(flag if value is None else f"{flag} {value}")
        i += 1
    if notes:
        _stderr(f"| note: {', '.join(notes)}: accepted, changes nothing here (the scoring rule, the loss and "
                "the batching of windows are fixed; --criterion cross_entropy and vocab_parallel_cross_entropy "
                "give the same log-probs)")
    return args


def setup_devices(args) -> None:
    """--cpu and --distributed-world-size: before JAX starts, the CPU backend gets that many simulated devices."""
    import jax

    from m11b_jax.runtime import backends_initialized, configure_cpu_devices, force_cpu_platform

    if args.distributed_world_size is not None and args.distributed_world_size < 1:
        raise UserError(f"--distributed-world-size {args.distributed_world_size} must be >= 1")
    if args.cpu:
        force_cpu_platform()
    if args.distributed_world_size is not None:
        if not backends_initialized():
            configure_cpu_devices(args.distributed_world_size)
        if jax.device_count() != args.distributed_world_size:
            raise UserError(f"--distributed-world-size {args.distributed_world_size} but {jax.device_count()} "
                            f"{jax.default_backend()} devices are present: pass --distributed-world-size "
                            f"{jax.device_count()} or omit it")


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compile_only:
        cfg = eval_config(load_config(args.arch), args.dtype)
        cfg.validate(args.model_parallel_size, tokens_per_sample=args.tokens_per_sample)
        ContextWindows(1, args.tokens_per_sample, args.context_window)  # the flags' one-line errors
        # A TPU slice compiles whole (all its chips and hosts; --batch-size is per data-parallel replica).
        mesh = aot.compile_only_mesh(args.target, args.model_parallel_size)
        report = aot.compile_eval_report(cfg, mesh, batch_size=args.batch_size,
                                         tokens_per_sample=args.tokens_per_sample, context_window=args.context_window,
                                         attention_chunk=args.attention_chunk, passes=args.passes)
        report["target"] = mesh.devices.flat[0].platform
        aot.add_target_headroom(report, args.target)
        print(json.dumps(report, indent=2))
        return
    if args.data is None or args.path is None:
        raise UserError("give DATA_BIN and --path CKPT (or --compile-only --arch NAME)")
    setup_devices(args)
    orig = original_token_count(args)
    summary, _ = run_eval(
        args.data, args.path, split=args.gen_subset, tokens_per_sample=args.tokens_per_sample,
        context_window=args.context_window, batch_size=args.batch_size, model_parallel_size=args.model_parallel_size,
        dtype=args.dtype, attention_chunk=args.attention_chunk, passes=args.passes, orig_token_count=orig,
        output_token_logprobs=args.output_token_logprobs, log=None if args.json else _stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print("\n".join(report_lines(summary, args.gen_subset)))


if __name__ == "__main__":
    main()

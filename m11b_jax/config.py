"""Model hyperparameters: one dataclass, loaded from `configs/*.json` by arch name or path.

Policies (remat, dtypes, layer scan) are named values here, not code branches in the model.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from m11b_jax.errors import UserError

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"

REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_attention")
# The remat policies that keep matmul outputs: they must see each projection as a plain `dot_general`.
MATMUL_SAVING_POLICIES = ("save_dots", "save_dots_no_batch", "save_attention")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("autodiff", "manual", "flash", "cudnn")
LOSS_IMPLS = ("logits", "fused")
WEIGHT_GRAD_IMPLS = ("flat", "transposed")
LR_SCHEDULERS = ("inverse_sqrt", "fixed")  # m11b_jax.optim's schedules
# fairseq's initialization rules (m11b_jax/init_rules.py says what each draws).
INIT_RULES = ("megatron", "megatron_mp1", "fairseq")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """fairseq `transformer_lm` hyperparameters (pre-LN decoder, sinusoidal positions, tied output)."""

    name: str = "custom"
    vocab_size: int = 51200
    d_model: int = 3072
    ffn_dim: int = 18432
    num_layers: int = 72
    num_heads: int = 32
    max_positions: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layernorm_eps: float = 1e-5
    pad_idx: int = 1
    # What a weight is stored as, and what the matmuls run in.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    # Rematerialization of each layer in the backward pass: one of REMAT_POLICIES.
    remat_policy: str = "full"
    # Layers under nn.scan (one compiled layer body) or unrolled (faster for tiny CPU models).
    scan_layers: bool = True
    # Attention core: "autodiff" (einsums, JAX derives the backward; the default, measured on GPUs and under
    # every remat policy) or "manual" (m11b_jax.attention: hand-written backward in plain-GEMM layouts, for
    # CPU runs without remat), or the fused GPU kernels of m11b_jax.flash_attention: "flash" (Pallas/Triton, with
    # attention dropout; Pallas interpret mode on CPUs) or "cudnn" (jax.nn.dot_product_attention; bf16/fp16,
    # attention dropout 0). The same function either way (flash's dropout mask is a hash, not the others' draw).
    attention_impl: str = "autodiff"
    # Queries per block of the "manual" attention: block i reads keys [0, end of block i) only, so the causally
    # masked rest is never computed (eval_lm's --attention-chunk sets it for scoring).
    attention_query_block: int = 128
    # Output projection + loss in training: "logits" (the model returns the [batch, length, V] logits and the
    # criterion takes them; the default, and the only choice with a model axis) or "fused"
    # (m11b_jax.loss.output_cross_entropy: one custom-VJP operation whose backward never forms the gradient of
    # the logits; for runs without model parallelism, e.g. on a CPU). The same loss and gradients either way.
    loss_impl: str = "logits"
    # Weight gradients of the layers' projections: "flat" (q/k/v and fc1 as one 2-D product, out_proj and fc2 by
    # autodiff; the default) or "transposed" (all six as a 2-D product in the form XLA:CPU runs in YNNPACK, on a
    # transposed copy of the narrower operand; for CPU runs without the save_dots remat policies). See
    # ops.matmul_flat_weight_grad. The same gradients either way.
    weight_grad_impl: str = "flat"
    # Initialization, one of INIT_RULES: "megatron" (fairseq's model-parallel layers as the release drew them,
    # model-parallel size > 1), "megatron_mp1" (the same at model-parallel size 1) or "fairseq" (fairseq's
    # single-device transformer_lm). See m11b_jax/init_rules.py.
    init: str = "megatron"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def num_params(self) -> int:
        """Exact parameter count (tied embedding, no output bias)."""
        d, f = self.d_model, self.ffn_dim
        per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # attn, attn biases, ffn, ffn biases, 2 LNs
        return self.num_layers * per_layer + self.vocab_size * d + 2 * d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, model_parallel_size: int = 1, tokens_per_sample: int | None = None) -> "ModelConfig":
        """One-line errors naming the problem and the fix; returns self so calls chain."""
        mp = model_parallel_size
        for field in ("vocab_size", "d_model", "ffn_dim", "num_layers", "num_heads", "max_positions"):
            if getattr(self, field) <= 0:
                raise UserError(f"{field}={getattr(self, field)} must be positive")
        if self.d_model % self.num_heads:
            raise UserError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}: "
                "choose heads that divide d_model (head_dim = d_model / heads)")
        if self.d_model % 2 or self.d_model < 4:
            raise UserError(f"d_model={self.d_model} must be even and >= 4 for sinusoidal positions")
        if mp < 1:
            raise UserError(f"--model-parallel-size {mp} must be >= 1")
        for field in ("num_heads", "ffn_dim", "vocab_size"):
            if getattr(self, field) % mp:
                raise UserError(
                    f"{field}={getattr(self, field)} is not divisible by the model-parallel size {mp}: "
                    f"pick --model-parallel-size dividing it (or pad the dictionary to a multiple of {mp})")
        if tokens_per_sample is not None and tokens_per_sample > self.max_positions:
            raise UserError(
                f"--tokens-per-sample {tokens_per_sample} exceeds the model's max_positions={self.max_positions}: "
                "lower --tokens-per-sample or use a config with more positions")
        if self.remat_policy not in REMAT_POLICIES:
            raise UserError(f"unknown remat policy {self.remat_policy!r}: choose one of {', '.join(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise UserError(f"unknown attention_impl {self.attention_impl!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
        if self.attention_query_block < 1:
            raise UserError(f"attention_query_block={self.attention_query_block} must be >= 1")
        if self.init not in INIT_RULES:
            raise UserError(f"unknown init {self.init!r}: choose one of {', '.join(INIT_RULES)}")
        if self.loss_impl not in LOSS_IMPLS:
            raise UserError(f"unknown loss_impl {self.loss_impl!r}: choose one of {', '.join(LOSS_IMPLS)}")
        if self.weight_grad_impl not in WEIGHT_GRAD_IMPLS:
            raise UserError(f"unknown weight_grad_impl {self.weight_grad_impl!r}: "
                            f"choose one of {', '.join(WEIGHT_GRAD_IMPLS)}")
        if self.weight_grad_impl == "transposed" and self.remat_policy in MATMUL_SAVING_POLICIES:
            raise UserError(f"weight_grad_impl='transposed' hides the projections from remat policy "
                            f"{self.remat_policy!r}, which saves matmul outputs: use --remat-policy none or full, "
                            "or weight_grad_impl='flat'")
        if self.attention_impl == "cudnn" and self.attention_dropout > 0:
            raise UserError(f"attention_impl='cudnn' has no attention dropout (attention_dropout="
                            f"{self.attention_dropout}): use --attention-impl flash, or --attention-dropout 0")
        if self.attention_impl == "cudnn" and self.compute_dtype == "float32":
            raise UserError("attention_impl='cudnn' runs in bfloat16 or float16, not float32: add --bf16 (or --fp16), "
                            "or use --attention-impl flash")
        if self.loss_impl == "fused" and mp > 1:
            raise UserError(f"loss_impl='fused' works without a model axis, not with --model-parallel-size {mp}: "
                            "use loss_impl='logits' (the vocab-parallel loss) or --model-parallel-size 1")
        for field in ("param_dtype", "compute_dtype"):
            if getattr(self, field) not in DTYPES:
                raise UserError(f"{field}={getattr(self, field)!r} is not one of {', '.join(DTYPES)}")
        for field in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise UserError(f"{field}={getattr(self, field)} must be in [0, 1)")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config keys {unknown}: known keys are {sorted(known)}")
        return cls(**d)


def largest_model_parallel(cfg: ModelConfig, n_devices: int) -> int:
    """The largest divisor of the device count the config can be split over (1 at least)."""
    for mp in range(n_devices, 0, -1):
        if n_devices % mp == 0:
            try:
                cfg.validate(mp)
                return mp
            except UserError:
                continue
    return 1


def available_archs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(arch: str, **overrides: Any) -> ModelConfig:
    """`arch` is a name in configs/ (e.g. `transformer_lm_megatron_11b`, `tiny`) or a path to a JSON file."""
    path = pathlib.Path(arch)
    if not path.suffix:
        path = CONFIG_DIR / f"{arch}.json"
    if not path.is_file():
        raise UserError(f"unknown arch {arch!r}: use one of {', '.join(available_archs())} or a path to a config JSON")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"config {path} is not valid JSON ({e}): fix the file") from None
    d.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig.from_dict(d)


def analytic_train_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """FLOPs of one forward+backward over batch x seq tokens: 6*N*tokens + attention.

    N counts the matmul parameters (layers + the tied output projection; the embedding lookup is free);
    attention scores and the weighted sum add 2 matmuls of 2*T*d FLOPs per token per layer forward
    (full, not causal-halved, as XLA computes them), times 3 for forward+backward.
    Remat recompute is not counted (the MFU convention counts model FLOPs, not hardware FLOPs).
    """
    d, f, L = cfg.d_model, cfg.ffn_dim, cfg.num_layers
    n_matmul = L * (4 * d * d + 2 * d * f) + cfg.vocab_size * d
    tokens = batch * seq
    attn = L * 2 * 2 * seq * d * tokens  # QK^T and PV, forward, 2 FLOPs per MAC
    return 6.0 * n_matmul * tokens + 3.0 * attn


def jax_dtype(name: str):
    """The jnp dtype of one of DTYPES (a config's param_dtype / compute_dtype)."""
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


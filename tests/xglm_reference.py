"""An implementation we did not write: transformers' XGLMForCausalLM computes fairseq's transformer_lm.

The weight names and config come from m11b_jax.hf (the one mapping, also used by `convert --to-hf`).
../shared/REFERENCE.md (last section) lists the traps handled here: always pass attention_mask, pass
fairseq's positions for left padding, force eager attention and check it stayed eager.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import XGLMConfig, XGLMForCausalLM

from m11b_jax.config import ModelConfig
from m11b_jax.hf import DERIVED_KEYS, hf_key, state_dict_from_params, xglm_config


def xglm_from_hf_state(state: dict, cfg: ModelConfig) -> XGLMForCausalLM:
    """Build an fp32 eager XGLM holding XGLM-named weights (`model.*`)."""
    fields = {k: v for k, v in xglm_config(cfg).items() if k not in ("architectures", "model_type", "dtype")}
    hf_cfg = XGLMConfig(**fields, attn_implementation="eager")
    hf_cfg.dropout = hf_cfg.attention_dropout = hf_cfg.activation_dropout = 0.0
    model = XGLMForCausalLM(hf_cfg).eval().to(torch.float32)
    sd = {k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= set(DERIVED_KEYS), missing
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    return model


def xglm_from_fairseq_state(state: dict, cfg: ModelConfig) -> XGLMForCausalLM:
    """Build an fp32 XGLM holding fairseq-named weights (`decoder.*`)."""
    skip = ("version", "_float_tensor")
    return xglm_from_hf_state({hf_key(k): v for k, v in state.items() if not k.endswith(skip)}, cfg)


def xglm_from_params(params, cfg: ModelConfig) -> XGLMForCausalLM:
    host = __import__("jax").device_get(params)
    return xglm_from_hf_state(state_dict_from_params(host, cfg), cfg)


def xglm_position_ids(tokens, pad_idx: int = 1) -> torch.Tensor:
    """fairseq's positions for any padding: XGLM adds 2, so the first real token -> 2, pads -> 1."""
    m = (torch.as_tensor(np.asarray(tokens)) != pad_idx).long()
    return torch.cumsum(m, 1) * m - 1


def xglm_logits(model: XGLMForCausalLM, tokens: np.ndarray, pad_idx: int = 1) -> np.ndarray:
    """Logits for fairseq-style inputs (any padding), with fairseq's positions."""
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    m = (ids != pad_idx).long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=m, position_ids=xglm_position_ids(ids, pad_idx))
    return out.logits.float().numpy()

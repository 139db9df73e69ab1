"""An implementation we did not write: transformers' XGLMForCausalLM computes fairseq's transformer_lm.

../shared/REFERENCE.md (last section) lists the traps handled here: always pass attention_mask, pass
fairseq's positions for left padding, force eager attention and check it stayed eager.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import XGLMConfig, XGLMForCausalLM

from m11b_jax.config import ModelConfig
from m11b_jax.fairseq_layout import to_fairseq_state_dict


def xglm_from_fairseq_state(state: dict, cfg: ModelConfig) -> XGLMForCausalLM:
    """Build an fp32 XGLM holding fairseq-named weights (`decoder.*`)."""
    hf_cfg = XGLMConfig(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
        attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions, scale_embedding=True,
        activation_function="gelu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, attn_implementation="eager",
    )
    model = XGLMForCausalLM(hf_cfg).eval().to(torch.float32)
    sd = {}
    for k, v in state.items():
        if k.endswith(("version", "_float_tensor")):
            continue
        sd["model." + k.removeprefix("decoder.")] = torch.from_numpy(np.asarray(v, dtype=np.float32).copy())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight", "model.embed_positions.weights"}, missing
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    return model


def xglm_from_params(params, cfg: ModelConfig) -> XGLMForCausalLM:
    host = __import__("jax").device_get(params)
    return xglm_from_fairseq_state(to_fairseq_state_dict(host, cfg.num_layers), cfg)


def xglm_logits(model: XGLMForCausalLM, tokens: np.ndarray, pad_idx: int = 1) -> np.ndarray:
    """Logits for fairseq-style inputs (any padding), with fairseq's positions."""
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    m = (ids != pad_idx).long()
    position_ids = torch.cumsum(m, 1) * m - 1  # XGLM adds 2: first real token -> 2, pads -> 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=m, position_ids=position_ids)
    return out.logits.float().numpy()

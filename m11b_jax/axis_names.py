"""Logical axis names: what each axis of a parameter or activation *is*.

The model labels every axis with one of these; `m11b_jax.sharding.logical_rules` (the one table) says which
mesh axis, if any, splits it. An activation axis that must be split like a weight's (the heads of q/k/v, the
fc1 features, the logits' vocabulary) carries that weight axis's name, so moving it is one line of the table.
"""

# Parameter axes (and the activation axes computed along them).
VOCAB = "vocab"  # the (tied) embedding's rows and the logits' last axis
EMBED = "embed"  # d_model, as a weight axis (split over `data` only by FSDP)
HEADS = "heads"  # attention heads x head_dim, as q/k/v's output and out_proj's input features
MLP = "mlp"  # the feed-forward hidden features (fc1 out, fc2 in)
LAYERS = "layers"  # the stacked-layer axis of every per-layer parameter

# Activation-only axes.
BATCH = "activation_batch"
RESIDUAL_LENGTH = "activation_residual_length"  # tokens of the residual stream (split by sequence parallelism)
TP_LENGTH = "activation_tp_length"  # tokens inside a tensor-parallel region: attention, MLP, logits (never split)
ACTIVATION_EMBED = "activation_embed"  # d_model, as an activation's feature axis
HEAD_DIM = "activation_head_dim"  # features within one attention head

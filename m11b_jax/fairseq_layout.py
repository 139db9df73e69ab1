"""Where each fairseq (PyTorch) weight lives in our parameter tree, and how the release split it over ranks.

fairseq names (prefix `decoder.`) map to our tree paths; fairseq's nn.Linear weights are [out, in], ours [in, out].
Layer tensors are stacked on a leading `layers` axis in our tree (one entry per fairseq `layers.{i}` key).
Each entry's `split_dim` says along which fairseq dimension the model-parallel ranks hold contiguous blocks
(None: replicated on every rank), per ../shared/REFERENCE.md's shard table.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
    fairseq: str  # fairseq key without `decoder.` and, for layer tensors, without `layers.{i}.`
    ours: tuple[str, ...]  # path in our params tree
    per_layer: bool
    transpose: bool  # fairseq [out, in] <-> our [in, out]
    split_dim: int | None  # fairseq dim split across model-parallel ranks; None = replicated


ENTRIES: tuple[Entry, ...] = (
    Entry("embed_tokens.weight", ("embed_tokens",), False, False, 0),  # vocab-parallel rows
    Entry("layer_norm.weight", ("layer_norm", "scale"), False, False, None),
    Entry("layer_norm.bias", ("layer_norm", "bias"), False, False, None),
    *(Entry(f"self_attn.{p}_proj.weight", ("layers", "self_attn", f"{p}_proj", "kernel"), True, True, 0)
      for p in "qkv"),  # column-parallel
    *(Entry(f"self_attn.{p}_proj.bias", ("layers", "self_attn", f"{p}_proj", "bias"), True, False, 0)
      for p in "qkv"),
    Entry("self_attn.out_proj.weight", ("layers", "self_attn", "out_proj", "kernel"), True, True, 1),  # row-parallel
    Entry("self_attn.out_proj.bias", ("layers", "self_attn", "out_proj", "bias"), True, False, None),
    Entry("fc1.weight", ("layers", "fc1", "kernel"), True, True, 0),
    Entry("fc1.bias", ("layers", "fc1", "bias"), True, False, 0),
    Entry("fc2.weight", ("layers", "fc2", "kernel"), True, True, 1),
    Entry("fc2.bias", ("layers", "fc2", "bias"), True, False, None),
    *(Entry(f"{ln}.{w}", ("layers", ln, o), True, False, None)
      for ln in ("self_attn_layer_norm", "final_layer_norm") for w, o in (("weight", "scale"), ("bias", "bias"))),
)

# Keys that carry no weights (`embed_positions.weights`: a sinusoid table some old fairseq versions stored).
BOOKKEEPING = re.compile(r"^decoder\.(version|embed_positions\._float_tensor|embed_positions\.weights)$")
VERSION_KEY = "decoder.version"
# Newer fairseq also stores the tied output projection under its own name: the same tensor as the embedding.
TIED_ALIASES = {"decoder.output_projection.weight": "decoder.embed_tokens.weight"}
# fairseq's module order inside a decoder layer (k, v, q as MultiheadAttention registers them); used when writing.
_LAYER_ORDER = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm")


def fairseq_key(entry: Entry, layer: int | None = None) -> str:
    return f"decoder.layers.{layer}.{entry.fairseq}" if entry.per_layer else f"decoder.{entry.fairseq}"


def get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def to_fairseq_state_dict(params, num_layers: int) -> dict[str, np.ndarray]:
    """Our (host, unsharded) params -> fairseq's merged state dict of numpy arrays (test and export helper)."""
    out = {}
    for e in ENTRIES:
        arr = np.asarray(get_path(params, e.ours))
        for i in range(num_layers) if e.per_layer else [None]:
            a = arr[i] if e.per_layer else arr
            out[fairseq_key(e, i)] = np.ascontiguousarray(a.T if e.transpose else a)
    return out


def fairseq_keys(num_layers: int) -> list[tuple[str, Entry, int | None]]:
    """Every weight key of the merged/sharded state dict, in fairseq's module order: (key, entry, layer)."""
    def rank(e: Entry) -> int:
        module = e.fairseq.rsplit(".", 1)[0]
        return _LAYER_ORDER.index(module) * 2 + (e.fairseq.endswith(".bias"))

    top = [(fairseq_key(e), e, None) for e in ENTRIES if not e.per_layer]
    layer_entries = sorted((e for e in ENTRIES if e.per_layer), key=rank)
    layers = [(fairseq_key(e, i), e, i) for i in range(num_layers) for e in layer_entries]
    embed = [t for t in top if t[1].fairseq.startswith("embed_tokens")]
    return embed + layers + [t for t in top if t not in embed]


def our_split_axis(entry: Entry) -> int | None:
    """The axis of our leaf (the stacked `layers` axis counted) that model-parallel ranks split; None if replicated."""
    if entry.split_dim is None:
        return None
    axis = (1 - entry.split_dim) if entry.transpose else entry.split_dim
    return axis + (1 if entry.per_layer else 0)


def fairseq_shard_shape(entry: Entry, our_shape: tuple[int, ...], mp: int) -> tuple[int, ...]:
    """Shape of one rank's fairseq tensor, given our leaf's (stacked) shape and the model-parallel size."""
    shape = list(our_shape[1:] if entry.per_layer else our_shape)
    if entry.transpose:
        shape.reverse()
    if entry.split_dim is not None:
        shape[entry.split_dim] //= mp
    return tuple(shape)


def rank_block(entry: Entry, our_shape: tuple[int, ...], layer: int | None, rank: int, mp: int) -> tuple:
    """Index into our leaf of what `rank` holds of this entry for `layer` (ints and slices)."""
    index: list = [slice(None)] * len(our_shape)
    if entry.per_layer:
        index[0] = layer
    axis = our_split_axis(entry)
    if axis is not None:
        n = our_shape[axis] // mp
        index[axis] = slice(rank * n, (rank + 1) * n)
    return tuple(index)


def to_ours(entry: Entry, block: np.ndarray) -> np.ndarray:
    """A fairseq tensor ([out, in]) in our layout ([in, out]); a view, not a copy."""
    return block.T if entry.transpose else block


to_fairseq = to_ours  # the transpose is its own inverse

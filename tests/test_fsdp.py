"""--fsdp: weights and Adam state also split over `data` (ZeRO-3 style). Same training as pure tensor
parallelism, and the compiled step gathers each layer's weights inside the layer loop, never a whole stack, and
reduce-scatters each layer's weight gradients there."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from m11b_jax import aot
from m11b_jax import sharding as S
from m11b_jax.config import load_config
from m11b_jax.errors import UserError
from m11b_jax.train import parse_args
from m11b_jax.train_step import (OptimConfig, abstract_train_state, batch_shardings, init_train_state,
                                 make_train_step, state_from_params, state_shardings)

PAD = 1


def _losses(cfg, ocfg, host_params, batches, data, model, fsdp):
    mesh = S.make_mesh(model, jax.devices()[: data * model])
    rules = S.logical_rules(sequence_parallel=model > 1, fsdp=fsdp)
    shardings = state_shardings(cfg, mesh, rules)
    state = state_from_params(jax.device_put(host_params, shardings.params), ocfg, shardings)
    if fsdp and data > 1:  # every weight's d_model axis is split over data, and so is its Adam state
        assert state.params["layers"]["fc1"]["kernel"].sharding.spec == P(None, S.DATA, S.MODEL)
        assert state.opt_state.nu["embed_tokens"].sharding.spec == P(S.MODEL, S.DATA)
    step = make_train_step(cfg, mesh, rules, ocfg, seed=3)
    bs = batch_shardings(mesh, rules)
    losses = []
    for b in batches:
        state, m = step(state, {k: jax.device_put(v, bs[k]) for k, v in b.items()})
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params)


def test_fsdp_meshes_train_like_pure_model_parallelism():
    """(2, 4) and (4, 2) with --fsdp vs (1, 8) without: three updates of the tiny model from the same
    parameters on the same batches give the same losses and parameters (to float reassociation)."""
    cfg = load_config("tiny", dropout=0.0, attention_dropout=0.0, max_positions=32)
    ocfg = OptimConfig(lr=1e-3, warmup_updates=0, clip_norm=1.0)
    host_params = jax.device_get(init_train_state(cfg, S.make_mesh(8), S.logical_rules(), ocfg, seed=5).params)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        tok = rng.integers(4, cfg.vocab_size, size=(1, 8, 33)).astype(np.int32)
        tok[0, 3, 20:] = PAD
        batches.append({"source": tok[..., :-1], "target": tok[..., 1:]})
    ref_losses, ref_params = _losses(cfg, ocfg, host_params, batches, 1, 8, fsdp=False)
    assert ref_losses[2] < ref_losses[0]  # it trains
    for data, model in [(2, 4), (4, 2)]:
        losses, params = _losses(cfg, ocfg, host_params, batches, data, model, fsdp=True)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-6, err_msg=f"({data}, {model})")
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            # Within 10% of one update (lr 1e-3): Adam normalizes the rounding noise of gradients that are ~0
            # (k_proj's bias has an exactly zero gradient), so those entries differ by up to ~2e-5.
            np.testing.assert_allclose(a, b, rtol=0, atol=0.1 * ocfg.lr)


LAYERS, DATA, MODEL, BATCH = 3, 2, 4, 4  # a stacked weight is [3, ...]; an activation [4, ...]


def _collective_lines(hlo: str, kind: str):
    """(computation name, result shapes, devices per group) of every `kind` collective in the program."""
    out, comp = [], None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            comp = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else "ENTRY"
        elif re.search(rf"\s{kind}(-start)?\(", line):
            lhs = line.split(f" {kind}")[0]
            out.append((comp, re.findall(r"\w+\[[\d,]*\]", lhs.split("=", 1)[1]), aot._group_size(line)))
    return out


def _dims(shape: str) -> list[int]:
    return [int(x) for x in shape[shape.index("[") + 1:-1].split(",") if x]


def _one_layer(shape: str) -> str:
    """'f32[1,128,32]' (one layer's slice of a stack, as XLA may gather it) or 'f32[128,32]' -> '[128,32]'."""
    dims = _dims(shape)
    return str(dims[1:] if len(dims) == 3 and dims[0] == 1 else dims).replace(" ", "")


@pytest.fixture(scope="module")
def fsdp_hlo():
    cfg = load_config("tiny", remat_policy="full", num_layers=LAYERS, dropout=0.0, attention_dropout=0.0)
    mesh = S.make_mesh(MODEL, jax.devices()[: DATA * MODEL])
    compiled, _ = aot.compile_train_step(cfg, mesh, batch_size=BATCH, tokens_per_sample=64, fsdp=True)
    return cfg, compiled.as_text()


def test_fsdp_gathers_each_layers_weights_inside_the_layer_loop(fsdp_hlo):
    cfg, hlo = fsdp_hlo
    d, f, mp = cfg.d_model, cfg.ffn_dim, MODEL
    # One layer's weights as this model shard holds them once gathered over data: q/k/v and fc1 column-parallel,
    # out_proj and fc2 row-parallel (XLA may gather q/k/v as one or separately; fc1 and fc2 always appear).
    layer_weights = {f"[{d},{f // mp}]", f"[{f // mp},{d}]", f"[{d},{d // mp}]", f"[{d // mp},{d}]"}
    bodies = set(aot.collectives(hlo, split_loops=True)["loop_bodies"])
    gathers = _collective_lines(hlo, "all-gather")
    weight_gathers = [(c, s, g) for c, shapes, g in gathers for s in shapes if _one_layer(s) in layer_weights]
    assert weight_gathers, "no layer weight is all-gathered: FSDP is not in effect"
    for comp, shape, group in weight_gathers:
        assert comp in bodies, f"layer weight {shape} gathered outside the layer loop ({comp})"
        assert group == DATA, f"{shape} gathered over {group} devices, not the data axis"
    # fc1 and fc2 are gathered in the forward loop and again in the backward loop (remat 'full' recomputes).
    for w in (f"[{d},{f // mp}]", f"[{f // mp},{d}]"):
        assert len({c for c, s, _ in weight_gathers if _one_layer(s) == w}) == 2, w
    # Nothing gathered whole: no all-gather anywhere yields a stacked [layers, ...] weight (or its gradient).
    for comp, shapes, _ in gathers:
        for s in shapes:
            dims = _dims(s)
            assert not (len(dims) == 3 and dims[0] == LAYERS), f"a whole layer stack gathered: {s} in {comp}"


def test_fsdp_reduce_scatters_each_layers_weight_gradients_inside_the_backward_loop(fsdp_hlo):
    """Each layer's weight gradients are summed over the data axis in the backward loop, as they are produced,
    by a reduce-scatter into the shard each replica stores (sharding.fsdp_matmul): never all-reduced whole,
    never as a whole [layers, ...] stack after the loop."""
    cfg, hlo = fsdp_hlo
    d, f, mp = cfg.d_model, cfg.ffn_dim, MODEL
    bodies = aot.collectives(hlo, split_loops=True)["loop_bodies"]
    scattered = _collective_lines(hlo, "reduce-scatter")
    all_reduced = _collective_lines(hlo, "all-reduce")
    # This device's shard of each projection's kernel: fc1, fc2, q/k/v, out_proj (d_model split over data).
    shards = {"fc1": f"[{d // DATA},{f // mp}]", "fc2": f"[{f // mp},{d // DATA}]",
              "qkv": f"[{d // DATA},{d // mp}]", "out_proj": f"[{d // mp},{d // DATA}]"}
    for name, shard in shards.items():
        found = [(c, g) for c, shapes, g in scattered for s in shapes if _one_layer(s) == shard]
        assert found, f"{name}'s gradient {shard} is not reduce-scattered"
        assert all(c in bodies and g == DATA for c, g in found), (name, found)
    # A whole (gathered) kernel gradient is never all-reduced: the reduce-scatter replaced it.
    whole = {f"[{d},{f // mp}]", f"[{f // mp},{d}]", f"[{d},{d // mp}]", f"[{d // mp},{d}]"}
    for comp, shapes, _ in all_reduced:
        assert not any(_one_layer(s) in whole for s in shapes), f"a whole weight gradient all-reduced: {shapes}"
    for comp, shapes, _ in scattered + all_reduced:
        for s in shapes:
            dims = _dims(s)
            assert not (len(dims) == 3 and dims[0] == LAYERS), f"a whole stack of gradients reduced: {s} in {comp}"


def test_fsdp_stores_a_shard_of_every_weight_and_moment():
    """Per-device bytes of the train state shrink by the data axis (2) with --fsdp, measured on the shardings."""
    cfg = load_config("tiny")
    mesh = S.make_mesh(MODEL, jax.devices()[: DATA * MODEL])

    def per_device_bytes(fsdp):
        state = abstract_train_state(cfg, mesh, S.logical_rules(fsdp=fsdp), OptimConfig())
        return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in jax.tree.leaves(state)
                   if a.ndim)

    plain, sharded = per_device_bytes(False), per_device_bytes(True)
    assert sharded < 0.51 * plain  # everything with a d_model axis halves (biases of q/k/v/fc1 do not)


def test_fsdp_needs_a_data_axis_dividing_d_model():
    assert parse_args(["--arch", "tiny", "--batch-size", "2", "--fsdp"]).fsdp
    mesh = S.make_mesh(2, jax.devices()[:6])  # (3, 2)
    with pytest.raises(UserError, match=r"--fsdp splits d_model=128 over the 3 data-parallel replicas"):
        aot.compile_train_step(load_config("tiny"), mesh, batch_size=2, tokens_per_sample=32, fsdp=True)

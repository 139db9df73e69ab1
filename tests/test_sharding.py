"""Megatron sharding invariants: the vocab-parallel loss, the collectives of the compiled step, the real size."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m11b_jax import aot, eval_lm, sharding
from m11b_jax.axis_names import BATCH, TP_LENGTH, VOCAB
from m11b_jax.config import load_config
from m11b_jax.errors import UserError
from m11b_jax.loss import vocab_parallel_cross_entropy
from m11b_jax.param_tree import init_params, param_shardings
from m11b_jax.train_step import OptimConfig, batch_shardings, make_eval_loss, make_train_step, state_from_params, \
    state_shardings

PAD = 1


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (1, 1)])
def test_vocab_parallel_loss_equals_optax_value_and_gradient(shape):
    data, model = shape
    mesh, rules = sharding.make_mesh(model, jax.devices()[: data * model]), sharding.logical_rules()
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((4, 16, 64)) * 4, jnp.float32)
    targets = rng.integers(0, 64, (4, 16))
    targets[0, 10:] = PAD
    targets[3, :3] = PAD
    targets = jnp.asarray(targets, jnp.int32)

    def ref(lg):
        nll = optax.softmax_cross_entropy_with_integer_labels(lg, targets)
        return jnp.where(targets != PAD, nll, 0.0).sum()

    def ours(lg):
        return vocab_parallel_cross_entropy(lg, targets, mesh, rules, PAD)[0]

    sharded = jax.device_put(logits, sharding.named_sharding(mesh, rules, (BATCH, TP_LENGTH, VOCAB)))
    value, grad = jax.jit(jax.value_and_grad(ours))(sharded)
    ref_value, ref_grad = jax.value_and_grad(ref)(logits)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)
    assert int(vocab_parallel_cross_entropy(sharded, targets, mesh, rules, PAD)[1]) == int((targets != PAD).sum())


def test_where_vocab_lives_is_one_line_of_the_table():
    """A table whose `vocab` line says "no axis" (the one line changed) replicates the embedding and the logits
    over `model`; one train step, the validation loss and eval_lm's scores then agree with the default table's."""
    cfg = load_config("tiny", max_positions=32, dropout=0.0, attention_dropout=0.0)
    mesh = sharding.make_mesh(2)  # (4, 2)
    default = sharding.logical_rules()
    no_vocab = tuple((name, None if name == VOCAB else axis) for name, axis in default)
    assert sum(a != b for a, b in zip(default, no_vocab)) == 1
    tokens = np.random.default_rng(1).integers(4, cfg.vocab_size, size=(8, 33)).astype(np.int32)
    tokens[5, 25:] = PAD
    stream = np.random.default_rng(2).integers(4, cfg.vocab_size, size=150)
    windows = eval_lm.ContextWindows(len(stream), tokens_per_sample=32, context_window=16)
    ocfg = OptimConfig(lr=1e-3, warmup_updates=0, clip_norm=0.5)
    params = jax.device_get(init_params(cfg, mesh, default, seed=4))
    out = {}
    for name, rules in (("default", default), ("no_vocab", no_vocab)):
        placed = jax.device_put(params, param_shardings(cfg, mesh, rules))
        rows = sharding.batch_sharding(mesh, 2, rules=rules)
        valid = make_eval_loss(cfg, mesh, rules)(placed, jax.device_put(tokens[:, :-1], rows),
                                                 jax.device_put(tokens[:, 1:], rows))
        scores = eval_lm.evaluate(placed, cfg, stream, windows, mesh, rules, batch_size=2, passes=1).token_logprobs
        bs = batch_shardings(mesh, rules)
        batch = {"source": jax.device_put(tokens[None, :, :-1], bs["source"]),
                 "target": jax.device_put(tokens[None, :, 1:], bs["target"])}
        state = state_from_params(placed, ocfg, state_shardings(cfg, mesh, rules))
        state, metrics = make_train_step(cfg, mesh, rules, ocfg)(state, batch)
        out[name] = (placed["embed_tokens"].sharding.spec, jax.device_get((valid, scores, metrics, state.params)))
    assert out["default"][0] == jax.sharding.PartitionSpec("model", None)
    assert out["no_vocab"][0] == jax.sharding.PartitionSpec(None, None)
    (valid, scores, metrics, new_params), (valid_n, scores_n, metrics_n, new_params_n) = (
        out["default"][1], out["no_vocab"][1])
    np.testing.assert_allclose(valid_n[0], valid[0], rtol=1e-6)
    assert int(valid_n[1]) == int(valid[1]) == int((tokens[:, 1:] != PAD).sum())
    np.testing.assert_allclose(scores_n, scores, rtol=1e-5, atol=1e-5)
    for k in ("loss", "gnorm"):
        np.testing.assert_allclose(metrics_n[k], metrics[k], rtol=1e-5, err_msg=k)
    # Adam's first step moves each weight by about lr * sign(gradient): where a gradient is ~0 its rounding decides
    # the sign (4 of the embedding's 131072 entries here). The two updates agree to 1% of one step.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0.01 * ocfg.lr), new_params_n, new_params)


def _dims(shape: str) -> list[int]:
    """The dimensions of an HLO array shape such as `f32[4,64,3072]{2,1,0}`."""
    return [int(x) for x in shape[shape.index("[") + 1:shape.index("]")].split(",") if x]


def _compile_tiny(policy, sequence_parallel, layers=4):
    cfg = load_config("tiny", remat_policy=policy, num_layers=layers)
    compiled, _ = aot.compile_train_step(cfg, sharding.make_mesh(8), batch_size=4, tokens_per_sample=64,
                                         sequence_parallel=sequence_parallel)
    return cfg, compiled.as_text()


@pytest.mark.parametrize("policy, backward_all_reduces", [("none", 2), ("full", 3)])
def test_train_step_collectives_follow_megatron(policy, backward_all_reduces):
    """All-reduces per scanned layer body on a pure model-parallel (1, 8) mesh, without sequence parallelism:

    forward body: 2 -- after the row-parallel out_proj and after the row-parallel fc2 (Megatron's `g`).
    backward body: 2 -- the input gradients of the column-parallel q/k/v (one combined all-reduce) and of fc1
      (Megatron's `f`), plus with remat 'full' 1 recompute: out_proj's all-reduce is recomputed because fc1's
      input (LN2 of the attention output) is needed; fc2's recomputed all-reduce is dead and removed.
    outside the layers: 5 -- the vocab-parallel embedding lookup (masked local gather, then sum), the loss's
      all-reduce max and its all-reduce sum (sum of exp and target logit, combined), the logits' backward
      (hidden-state gradient is a partial sum over vocab shards), and the gradient norm's partial sums.
    No all-gather at all: no weight and no logits are ever gathered.
    """
    cfg, hlo = _compile_tiny(policy, sequence_parallel=False)
    split = aot.collectives(hlo, split_loops=True)
    bodies = sorted(b["all-reduce"]["count"] for b in split["loop_bodies"].values() if b["all-reduce"]["count"])
    assert bodies == sorted([2, backward_all_reduces])
    assert split["outside"]["all-reduce"]["count"] == 5
    total = aot.collectives(hlo)
    assert total["all-gather"]["count"] == 0
    assert total["all-to-all"]["count"] == 0 and total["collective-permute"]["count"] == 0


def test_sequence_parallel_gathers_only_activations():
    cfg, hlo = _compile_tiny("full", sequence_parallel=True)
    gathers = aot.collectives(hlo)["all-gather"]
    assert gathers["count"] > 0
    d, v, ffn = cfg.d_model, cfg.vocab_size, cfg.ffn_dim
    for shape in gathers["shapes"]:
        dims = _dims(shape)
        assert v not in dims, f"logits or embedding gathered: {shape}"
        assert ffn not in dims, f"an FFN weight or activation gathered: {shape}"
        assert dims[:2] == [4, 64], f"not a [batch, length, ...] activation: {shape}"


def test_collective_parser_reads_xla_group_forms():
    line = "%a = f32[4,8]{1,0} all-reduce(%x), replica_groups={{0},{1},{2}}, to_apply=%add"
    assert aot._group_size(line) == 1
    assert aot._group_size("%a = f32[2] all-gather(%x), replica_groups=[2,4]<=[8], dimensions={0}") == 4
    assert aot._group_size("%a = f32[2] all-reduce(%x), replica_groups=mesh['a'=2,'b'=4] {'b'}") == 4
    text = "ENTRY %main {\n  %a = f32[4,8]{1,0} all-reduce(%x), replica_groups={{0,1}}\n}\n"
    assert aot.collectives(text)["all-reduce"] == {"count": 1, "shapes": ["f32[4,8]"]}


def test_full_size_train_step_compiles_and_fits_80gb():
    """The release (11.03B params) on a (1, 8) mesh at 8 x 1024 tokens, compiled from abstract inputs."""
    cfg = load_config("transformer_lm_megatron_11b", compute_dtype="bfloat16")
    report = aot.compile_report(cfg, sharding.make_mesh(8), batch_size=8, tokens_per_sample=1024, sequence_parallel=True)
    assert report["params"] == cfg.num_params() and abs(report["params"] - 11.03e9) < 0.01e9
    mem = report["per_device_bytes"]
    # Params + two Adam moments (fp32) are arguments, 1/8 each per device.
    assert mem["arguments"] >= 3 * 4 * cfg.num_params() / 8
    assert mem["total"] <= 80 * 2**30
    aot.check_fits(report, 80)
    with pytest.raises(UserError, match="--device-memory-gb"):
        aot.check_fits(report, 16)
    vocab = {cfg.vocab_size, cfg.vocab_size // 8}  # never the logits or the embedding, whole or one shard
    assert not [s for s in report["collectives"]["all-gather"]["shapes"] if vocab & set(_dims(s))]

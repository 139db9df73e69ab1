"""Decoding: the cache reproduces the full forward, search equals transformers' generate, sampling rules,
the decode step's collectives, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m11b_jax import aot
from m11b_jax import param_tree, sharding
from m11b_jax.config import load_config
from m11b_jax.errors import UserError
from m11b_jax.generation import Generator, SearchOptions, bucket, left_pad, restrict
from m11b_jax.model import TransformerLM

PAD, EOS = 1, 2
CHI2_7DF_0999 = 24.322  # the chi-square distribution's 0.999 quantile at 7 degrees of freedom (tables)


def _cfg(**kw):
    return load_config("tiny", dropout=0.0, attention_dropout=0.0, **kw)


def _generator(shape=(1, 8), cfg=None, seed=1, eos_bias=0.0):
    data, model = shape
    cfg = cfg or _cfg()
    mesh = sharding.make_mesh(model, jax.devices()[: data * model])
    rules = sharding.logical_rules()
    params = param_tree.init_params(cfg, mesh, rules, seed=seed)
    if eos_bias:  # make </s> likely enough to end some rows early: shift the final LayerNorm towards E[eos]
        e = params["embed_tokens"][EOS]
        params = dict(params, layer_norm=dict(params["layer_norm"],
                                              bias=params["layer_norm"]["bias"] + eos_bias * e / jnp.linalg.norm(e)))
        params = jax.device_put(params, param_tree.param_shardings(cfg, mesh, rules))
    return Generator(cfg, params, mesh, rules)


def _prompts(rng, lengths):
    return [[EOS] + rng.integers(4, 1000, n - 1).tolist() for n in lengths]


@pytest.mark.parametrize("shape", [(1, 1), (1, 8), (2, 4)])
def test_incremental_decode_equals_full_forward(shape):
    """Prefill + one step per token gives, at every step, the full forward's log-probs of the same sequence.
    Rows 0-1 are left-padded; rows 2-3 right-padded (prompt, pads, then the continuation: pads are masked keys
    wherever they are, and positions count real tokens only)."""
    gen = _generator(shape)
    rng = np.random.default_rng(0)
    prompts = _prompts(rng, (5, 9, 3, 12))
    tokens = left_pad(prompts, 4, 16, PAD)
    tokens[2:] = [np.concatenate([t[t != PAD], t[t == PAD]]) for t in tokens[2:]]
    cont = rng.integers(4, 1000, (4, 5)).astype(np.int32)
    full = np.concatenate([tokens, cont], 1)
    with sharding.activate(gen.mesh, gen.rules):
        ref = jax.jit(lambda p, t: TransformerLM(gen.cfg).apply({"params": p}, t))(gen.params, full)
    ref = np.array(jax.nn.log_softmax(np.asarray(ref, np.float32), -1))
    real = slice(PAD + 1, None)  # pad's log-prob is -inf in decoding
    cache = gen.init_cache(4, 32)
    lp, cache = gen.prefill(cache, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(lp)[:2, real], ref[:2, 15, real], atol=1e-5)  # right-padded: at a pad
    assert np.all(np.asarray(lp)[:, PAD] == -np.inf)
    for j in range(cont.shape[1]):
        lp, cache = gen.step(cache, jnp.asarray(cont[:, j]))
        np.testing.assert_allclose(np.asarray(lp)[:, real], ref[:, 16 + j, real], atol=1e-5)


def _hf_generate(gen, prompts, max_new, **kw):
    torch = pytest.importorskip("torch")
    from xglm_reference import xglm_from_params

    model = xglm_from_params(gen.params, gen.cfg)
    width = max(map(len, prompts))
    ids = torch.from_numpy(left_pad(prompts, len(prompts), width, PAD).astype(np.int64))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=(ids != PAD).long(), max_new_tokens=max_new,
                             pad_token_id=PAD, eos_token_id=EOS, bos_token_id=0, suppress_tokens=[PAD],
                             use_cache=True, **kw)
    result = []
    for row in out[:, width:].numpy().tolist():
        if EOS in row:
            row = row[: row.index(EOS) + 1]
        result.append(row)
    return result


@pytest.mark.parametrize("beam, eos_bias", [(1, 8.0), (3, 4.5)])
def test_greedy_and_beam_equal_transformers(beam, eos_bias):
    """Left-padded prompts of mixed lengths; </s> made likely enough that some rows end early and some not."""
    gen = _generator((1, 8), eos_bias=eos_bias)
    prompts = _prompts(np.random.default_rng(3), (4, 11, 7, 2, 9))
    ours = gen.generate(prompts, SearchOptions(max_new_tokens=12, beam=beam, lenpen=1.0))
    theirs = _hf_generate(gen, prompts, 12, do_sample=False, num_beams=beam, length_penalty=1.0,
                          **({"early_stopping": True} if beam > 1 else {}))
    assert [r.tokens for r in ours] == theirs
    assert any(r.tokens[-1] == EOS for r in ours) and any(r.tokens[-1] != EOS for r in ours)  # both endings seen
    assert all(r.prompt_ids == p for r, p in zip(ours, prompts))


def test_greedy_logprob_is_the_sum_of_the_chosen_tokens():
    gen = _generator((1, 1))
    prompts = _prompts(np.random.default_rng(4), (3, 6))
    res = gen.generate(prompts, SearchOptions(max_new_tokens=4))
    for r in res:
        seq = np.asarray([r.prompt_ids + r.tokens], np.int32)
        with sharding.activate(gen.mesh, gen.rules):
            lg = TransformerLM(gen.cfg).apply({"params": gen.params}, seq)
        lp = np.asarray(jax.nn.log_softmax(np.asarray(lg, np.float32), -1))[0]
        n = len(r.prompt_ids)
        expect = sum(lp[n - 1 + j, t] for j, t in enumerate(r.tokens))
        assert abs(r.logprob - expect) < 1e-4


def test_sampling_same_seed_same_output_on_any_mesh_and_top_k_1_is_greedy():
    prompts = _prompts(np.random.default_rng(5), (4, 8, 2))
    opts = SearchOptions(max_new_tokens=8, sampling=True, temperature=1.3, top_p=0.9, seed=11)
    one, eight = _generator((1, 1)), _generator((1, 8))
    a = [r.tokens for r in one.generate(prompts, opts)]
    assert a == [r.tokens for r in eight.generate(prompts, opts)]
    assert a == [r.tokens for r in one.generate(prompts, opts, batch_size=1)]  # batching does not matter
    assert a != [r.tokens for r in one.generate(prompts, SearchOptions(**{**opts.__dict__, "seed": 12}))]
    greedy = [r.tokens for r in eight.generate(prompts, SearchOptions(max_new_tokens=8))]
    assert [r.tokens for r in eight.generate(prompts, SearchOptions(max_new_tokens=8, sampling=True, top_k=1,
                                                                     seed=3))] == greedy


def test_first_sampled_token_follows_the_softmax():
    """4096 draws of the first new token (one prompt repeated: each row draws with its own key) against the
    top-k-restricted softmax at temperature 0.7: Pearson chi-square below the 0.999 quantile for its degrees
    of freedom (fixed seed: deterministic)."""
    gen = _generator((1, 8))
    prompt = _prompts(np.random.default_rng(6), (5,))[0]
    n, k, temp = 4096, 8, 0.7
    res = gen.generate([prompt] * n, SearchOptions(max_new_tokens=1, sampling=True, temperature=temp, top_k=k,
                                                   seed=0), batch_size=1024)
    cache = gen.init_cache(1, 16)
    lp, _ = gen.prefill(cache, jnp.asarray(left_pad([prompt], 1, 16, PAD)))
    logits = np.asarray(lp, np.float64)[0] / temp
    top = np.argsort(-logits)[:k]
    p = np.exp(logits[top] - logits[top].max())
    p /= p.sum()
    counts = np.bincount([r.tokens[0] for r in res], minlength=gen.cfg.vocab_size)
    assert counts[top].sum() == n  # nothing outside the top k
    stat = ((counts[top] - n * p) ** 2 / (n * p)).sum()
    assert stat < CHI2_7DF_0999, (stat, counts[top], n * p)


def test_restrict_top_p_keeps_the_smallest_set_reaching_p():
    lp = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(restrict(lp, 0, 0.8)))[0]
    assert kept.tolist() == [True, True, False, False]
    kept = np.isfinite(np.asarray(restrict(lp, 0, 0.81)))[0]
    assert kept.tolist() == [True, True, True, False]
    assert np.isfinite(np.asarray(restrict(lp, 2, 1.0)))[0].tolist() == [True, True, False, False]


def test_decode_step_collectives_are_two_all_reduces_per_layer():
    """On a (1, 8) model-parallel mesh, the compiled decode step's layer body all-reduces exactly twice, the
    [batch, 1, d] outputs of the row-parallel out_proj and fc2 (Megatron's forward `g`); nothing is gathered."""
    gen = _generator((1, 8), cfg=_cfg(num_layers=4))
    b, d = 8, gen.cfg.d_model
    cache = gen.init_cache(b, 64)
    with sharding.activate(gen.mesh, gen.rules):
        fn = jax.jit(lambda p, c, t: gen._apply(p, c, t))
        hlo = fn.lower(gen.params, cache, jax.device_put(jnp.full((b, 1), 5, jnp.int32),
                                                          sharding.batch_sharding(gen.mesh, 2, rules=gen.rules))).compile().as_text()
    split = aot.collectives(hlo, split_loops=True)
    bodies = [body["all-reduce"] for body in split["loop_bodies"].values() if body["all-reduce"]["count"]]
    assert len(bodies) == 1 and bodies[0]["count"] == 2, split
    assert all(s.startswith(f"f32[{b},1,{d}]") for s in bodies[0]["shapes"]), bodies[0]["shapes"]
    total = aot.collectives(hlo)
    assert total["all-gather"]["count"] == 0 and total["all-to-all"]["count"] == 0


def test_bad_input_is_one_clear_error():
    gen = _generator((1, 1))
    with pytest.raises(UserError, match="outside the vocabulary"):
        gen.generate([[2, 5000]])
    with pytest.raises(UserError, match="empty"):
        gen.generate([[2, 5], []])
    with pytest.raises(UserError, match="positions"):
        gen.generate([[2] * 100], SearchOptions(max_new_tokens=29))
    with pytest.raises(UserError, match="--sampling"):
        gen.generate([[2]], SearchOptions(beam=2, sampling=True))
    assert bucket(1) == 16 and bucket(17) == 32 and bucket(64) == 64

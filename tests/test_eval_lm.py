"""eval_lm: the --context-window scoring rule against transformers' XGLMForCausalLM, on several meshes.

The reference below computes the rule directly from its statement (../shared/REFERENCE.md, eval_lm): one
full PyTorch forward per window inputs[max(0, s - C) : e] with inputs = [eos] + stream, keeping only the
block's targets. It shares no code with m11b_jax.eval_lm or m11b_jax.score_step.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from m11b_jax import eval_lm
from m11b_jax.checkpoint import Checkpointer
from m11b_jax.config import ModelConfig, load_config
from m11b_jax.dictionary import Dictionary
from m11b_jax.indexed_dataset import dtype_for_vocab, write_dataset
from m11b_jax.model import TransformerLM
from m11b_jax.param_tree import init_params
from m11b_jax.params_io import save_params
from m11b_jax.score_step import score_positions
from m11b_jax.sharding import logical_rules, make_mesh
from m11b_jax.train_step import OptimConfig, state_from_params, state_shardings
from xglm_reference import xglm_from_params, xglm_logits

CFG = ModelConfig(name="eval-tiny", vocab_size=64, d_model=32, ffn_dim=64, num_layers=2, num_heads=8,
                  max_positions=64, remat_policy="none")
EOS, PAD = 2, 1


def make_stream(n_tokens: int, seed: int) -> list[np.ndarray]:
    """Lines of random symbols (indices 4..vocab-1), each ending in </s>, n_tokens in all."""
    rng = np.random.default_rng(seed)
    lines, left = [], n_tokens
    while left:
        k = min(int(rng.integers(1, 30)), left)
        line = np.append(rng.integers(4, CFG.vocab_size, k - 1), EOS)
        lines.append(line)
        left -= k
    return lines


def write_data_bin(folder, lines, dict_symbols: int = CFG.vocab_size, split: str = "test"):
    folder.mkdir(parents=True, exist_ok=True)
    d = Dictionary()
    for i in range(dict_symbols - d.nspecial):
        d.add_symbol(f"w{i}", 100 - i)
    d.save(folder / "dict.txt")
    write_dataset(folder / split, lines, dtype_for_vocab(len(d)))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model saved as a params checkpoint, and two data-bins (300 and 40 tokens)."""
    root = tmp_path_factory.mktemp("eval")
    mesh = make_mesh(1, jax.devices()[:1])
    params = init_params(CFG, mesh, logical_rules(), seed=3)
    data = write_data_bin(root / "data", make_stream(300, seed=0))
    short = write_data_bin(root / "short", make_stream(40, seed=1))
    ckpt = save_params(params, root / "ckpt", CFG, dictionary_path=data / "dict.txt")
    return {"params": params, "ckpt": ckpt, "data": data, "short": short, "root": root}


def reference_logprobs(params, stream: np.ndarray, tokens_per_sample: int, context_window: int) -> np.ndarray:
    """The rule, one XGLM forward per block, token by token (float64 log-softmax of fp32 logits)."""
    model = xglm_from_params(params, CFG)
    inputs = np.concatenate([[EOS], stream[:-1]])
    block = tokens_per_sample - context_window
    out = np.full(len(stream), np.nan)
    for s in range(0, len(stream), block):
        e = min(s + block, len(stream))
        a = max(0, s - context_window)
        logits = torch.from_numpy(xglm_logits(model, inputs[a:e][None])[0]).double()
        logp = torch.log_softmax(logits, -1).numpy()
        for j in range(s, e):
            out[j] = logp[j - a, stream[j]]
    assert not np.isnan(out).any()
    return out


def stream_of(data_bin) -> np.ndarray:
    return np.asarray(eval_lm.load_split(data_bin, "test")[1], dtype=np.int64)


@pytest.mark.parametrize("mp", [1, 8])
def test_token_logprobs_match_xglm_rule(tiny, mp):
    """Per token, 1e-5: mesh (1,1) on one device and (1,8) model-parallel over 8 devices."""
    devices = jax.devices()[:mp]
    summary, result = eval_lm.run_eval(tiny["data"], tiny["ckpt"], tokens_per_sample=64, context_window=48,
                                       batch_size=4, model_parallel_size=mp, passes=4 if mp == 1 else 2,
                                       devices=devices)
    stream = stream_of(tiny["data"])
    ref = reference_logprobs(tiny["params"], stream, 64, 48)
    assert result.token_logprobs.shape == (300,)
    np.testing.assert_allclose(result.token_logprobs, ref, atol=1e-5, rtol=0)
    assert summary["ntokens"] == 300
    assert summary["loss_base2"] == pytest.approx(-ref.mean() / math.log(2), rel=1e-6)
    assert summary["ppl"] == pytest.approx(2 ** (-ref.mean() / math.log(2)), rel=1e-6)


def test_window_longer_than_stream(tiny):
    """tokens_per_sample - context_window > stream: one window, no context, every token scored."""
    _, result = eval_lm.run_eval(tiny["short"], tiny["ckpt"], tokens_per_sample=64, context_window=16,
                                 batch_size=2, devices=jax.devices()[:1])
    ref = reference_logprobs(tiny["params"], stream_of(tiny["short"]), 64, 16)
    np.testing.assert_allclose(result.token_logprobs, ref, atol=1e-5, rtol=0)


def test_no_context_window_and_data_parallel(tiny):
    """context 0 (fairseq's default: independent blocks) on a (2, 4) mesh: batch split over data."""
    _, result = eval_lm.run_eval(tiny["data"], tiny["ckpt"], tokens_per_sample=32, context_window=0,
                                 batch_size=4, model_parallel_size=4, passes=2, devices=jax.devices())
    ref = reference_logprobs(tiny["params"], stream_of(tiny["data"]), 32, 0)
    np.testing.assert_allclose(result.token_logprobs, ref, atol=1e-5, rtol=0)


def test_batch_size_and_chunking_do_not_change_results(tiny):
    runs = [eval_lm.run_eval(tiny["data"], tiny["ckpt"], tokens_per_sample=64, context_window=48, batch_size=bs,
                             attention_chunk=chunk, passes=passes, devices=jax.devices()[:1])[1].token_logprobs
            for bs, chunk, passes in ((1, 64, 1), (5, 64, 1), (16, 7, 4), (6, 64, 6))]
    for other in runs[1:]:
        np.testing.assert_allclose(other, runs[0], atol=2e-6, rtol=0)


def test_windows_follow_the_rule():
    """The batch builder's windows, first-target offsets and targets, written out by hand for one case."""
    w = eval_lm.ContextWindows(num_tokens=10, tokens_per_sample=6, context_window=2)  # blocks of 4: 0-3, 4-7, 8-9
    stream = np.arange(10, 20)
    tokens, first, targets = w.batch(stream, np.array([0, 1, 2, -1]), eos=EOS, pad=PAD)
    inputs = [EOS, *range(10, 19)]  # [eos] + stream[:-1]
    np.testing.assert_array_equal(tokens[0], inputs[0:4] + [PAD] * 2)
    np.testing.assert_array_equal(tokens[1], inputs[2:8])
    np.testing.assert_array_equal(tokens[2], inputs[6:10] + [PAD] * 2)
    np.testing.assert_array_equal(tokens[3], [PAD] * 6)
    np.testing.assert_array_equal(first[:3], [0, 2, 2])
    np.testing.assert_array_equal(targets[:3], [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, PAD, PAD]])
    np.testing.assert_array_equal(targets[3], [PAD] * 4)


def test_normalized_perplexity():
    assert round(eval_lm.normalized_ppl(8.46, 270847, 245566), 2) == 10.54
    assert eval_lm.normalized_ppl(8.46, 100, 100) == pytest.approx(8.46)


def test_cli_json_and_token_logprobs_file(tiny, capsys):
    out = tiny["root"] / "lp.npy"
    tokens_file = tiny["root"] / "orig.tokens"
    tokens_file.write_text(" ".join(["w"] * 250) + "\n")
    eval_lm.main([str(tiny["data"]), "--path", str(tiny["ckpt"]), "--tokens-per-sample", "64",
                  "--context-window", "48", "--batch-size", "4", "--orig-tokens-file", str(tokens_file),
                  "--output-token-logprobs", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    saved = np.load(out)
    assert saved.shape == (300,) and saved.dtype == np.float32
    loss = -saved.astype(np.float64).mean() / math.log(2)
    assert report["ntokens"] == 300
    assert report["loss_base2"] == pytest.approx(loss, rel=1e-9)
    assert report["normalized_ppl"] == pytest.approx(2 ** (loss * 300 / 250), rel=1e-9)
    assert report["tokens_per_s"] > 0 and report["elapsed_s"] > 0
    assert not [p for p in tiny["root"].iterdir() if p.name.startswith("lp.npy.")]  # no temporary left


def test_cli_text_report(tiny, capsys):
    eval_lm.main([str(tiny["data"]), "--path", str(tiny["ckpt"]), "--tokens-per-sample", "64",
                  "--context-window", "48", "--orig-token-count", "250"])
    text = capsys.readouterr().out
    assert "evaluated 300 tokens" in text and "Loss (base 2):" in text and "Normalized perplexity:" in text


# ---- bad input: one clear line each -------------------------------------------------------------


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        eval_lm.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_error_dictionary_does_not_match_checkpoint(tiny, tmp_path, capsys):
    other = write_data_bin(tmp_path / "other", make_stream(50, seed=2), dict_symbols=CFG.vocab_size - 8)
    err = _error(capsys, [str(other), "--path", str(tiny["ckpt"]), "--tokens-per-sample", "64",
                          "--context-window", "48"])
    assert "(56 symbols)" in err and "vocabulary 64" in err and "--srcdict" in err


def test_error_dictionary_size_without_stored_dictionary(tiny, tmp_path, capsys):
    """A checkpoint saved without dict.txt: only the size can be checked (any dictionary inside the vocabulary)."""
    ckpt = tmp_path / "ckpt"
    save_params(tiny["params"], ckpt, CFG)
    larger = write_data_bin(tmp_path / "larger", make_stream(50, seed=2), dict_symbols=CFG.vocab_size + 8)
    err = _error(capsys, [str(larger), "--path", str(ckpt), "--tokens-per-sample", "64", "--context-window", "48"])
    assert "has 72 symbols but the checkpoint's vocabulary is only 64" in err
    padded = write_data_bin(tmp_path / "padded", make_stream(50, seed=2), dict_symbols=CFG.vocab_size - 3)
    eval_lm.main([str(padded), "--path", str(ckpt), "--tokens-per-sample", "64", "--context-window", "48", "--json"])
    assert json.loads(capsys.readouterr().out)["ntokens"] == 50


def test_error_dictionary_same_size_other_symbols(tiny, tmp_path, capsys):
    other = write_data_bin(tmp_path / "other", make_stream(50, seed=2))
    d = Dictionary.load(other / "dict.txt")
    d.symbols[10] = "something-else"
    d.save(other / "dict.txt")
    err = _error(capsys, [str(other), "--path", str(tiny["ckpt"]), "--tokens-per-sample", "64",
                          "--context-window", "48"])
    assert "(64 symbols) is not the checkpoint's dictionary" in err


def test_error_context_window_not_below_tokens_per_sample(tiny, capsys):
    err = _error(capsys, [str(tiny["data"]), "--path", str(tiny["ckpt"]), "--tokens-per-sample", "64",
                          "--context-window", "64"])
    assert "--context-window 64" in err and "smaller than --tokens-per-sample 64" in err


def test_error_missing_split(tiny, capsys):
    err = _error(capsys, [str(tiny["data"]), "--path", str(tiny["ckpt"]), "--gen-subset", "valid",
                          "--tokens-per-sample", "64", "--context-window", "48"])
    assert "split 'valid' not found" in err and "it has: test" in err


@pytest.mark.parametrize("kind", ["missing", "file", "garbage", "truncated"])
def test_error_unreadable_checkpoint(tiny, tmp_path, capsys, kind):
    import shutil

    path = tmp_path / "ckpt"
    if kind == "file":
        path.write_bytes(b"\x80not a checkpoint")
    elif kind == "garbage":
        path.mkdir()
        (path / "checkpoint.json").write_text("{not json")
    elif kind == "truncated":
        shutil.copytree(tiny["ckpt"], path)
        shutil.rmtree(path / "params" / "layers.fc1.kernel")
    err = _error(capsys, [str(tiny["data"]), "--path", str(path), "--tokens-per-sample", "64",
                          "--context-window", "48"])
    assert str(path) in err


def test_error_tokens_per_sample_beyond_model_positions(tiny, capsys):
    err = _error(capsys, [str(tiny["data"]), "--path", str(tiny["ckpt"]), "--tokens-per-sample", "128",
                          "--context-window", "96"])
    assert "max_positions=64" in err


@pytest.mark.parametrize("dtype, atol, chunk, last_layer_only",
                         [("float32", 1e-5, 7, True), ("float32", 1e-5, 16, False), ("bfloat16", 0.1, 16, True)])
def test_scoring_options_match_model_forward(dtype, atol, chunk, last_layer_only):
    """The scoring step's options of the one model (causal query chunks, incl. a ragged last chunk; the last
    layer only at the scored positions) give plain TransformerLM(cfg)(tokens)'s log-probabilities: to fp32
    rounding in float32, and close in bfloat16 (where the attention paths round differently). Right padding and
    scored positions past a row's end (pad targets, 0) included."""
    cfg = CFG.replace(param_dtype=dtype, compute_dtype=dtype)
    params = init_params(cfg, make_mesh(1, jax.devices()[:1]), logical_rules(), seed=5)
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(4, 64, (2, 48)), jnp.int32).at[1, 30:].set(PAD)
    targets = jnp.asarray(rng.integers(4, 64, (2, 8)), jnp.int32).at[0, 5:].set(PAD)  # row 0: 43..47 are pads
    first = jnp.asarray([43, 10], jnp.int32)
    got = np.array(score_positions(params, tokens, first, targets, cfg, attention_chunk=chunk,
                                    last_layer_only=last_layer_only))
    assert np.all(got[0, 5:] == 0)
    got[0, 5:] = np.nan
    logp = jax.nn.log_softmax(TransformerLM(cfg).apply({"params": params}, tokens).astype(jnp.float32), -1)
    index = np.minimum(np.asarray(first)[:, None] + np.arange(8), 47)
    want = np.stack([np.asarray(logp[r, index[r], np.asarray(targets[r])]) for r in range(2)])
    want[0, 5:] = np.nan
    assert np.all(want[~np.isnan(want)] < -1.0)  # real log-probs of a random model (vocab 64), not zeros
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def test_compile_only_release_on_8_devices_fp32(capsys):
    """The 11B eval step, model-parallel over 8 simulated devices in fp32, from abstract params: each device
    holds exactly 1/8 of every split weight and a copy of the rest; only all-reduces cross devices."""
    eval_lm.main(["--compile-only", "--arch", "transformer_lm_megatron_11b", "--model-parallel-size", "8",
                  "--dtype", "float32", "--batch-size", "8"])
    report = json.loads(capsys.readouterr().out)
    cfg = load_config("transformer_lm_megatron_11b")
    d, f, L, V = cfg.d_model, cfg.ffn_dim, cfg.num_layers, cfg.vocab_size
    split = L * (4 * d * d + 3 * d + 2 * d * f + f) + V * d  # q/k/v/out kernels, q/k/v biases, fc1/fc2, fc1 bias
    replicated = L * (d + d + 4 * d) + 2 * d  # out_proj and fc2 biases, two LayerNorms per layer, final LayerNorm
    assert split + replicated == cfg.num_params()
    assert report["param_bytes_per_device"] == 4 * (split // 8 + replicated)
    mem = report["per_device_bytes"]
    assert mem["arguments"] >= report["param_bytes_per_device"]
    assert mem["total"] < 6.5 * 2**30  # 5.14 GiB of weights + activations of 8 windows of 1024
    assert set(report["collectives"]) == {"all-reduce"}


def test_training_checkpoint_gives_the_same_scores(tiny, tmp_path):
    """--path may name an orbax training checkpoint (its save dir or one update): same params, same scores. Only
    the params subtree is read: a checkpoint whose optimizer state has another structure loads the same."""
    mesh = make_mesh(1, jax.devices()[:1])
    state = state_from_params(tiny["params"], OptimConfig(), state_shardings(CFG, mesh, logical_rules()))
    other_optimizer = {"step": state.step, "params": state.params, "opt_state": {"other": jnp.zeros(3)}}
    for name, tree in (("run", state), ("other", other_optimizer)):
        saver = Checkpointer(tmp_path / name)
        saver.save(7, tree, {"model_config": dataclasses.asdict(CFG)})
        saver.close()
    want = eval_lm.run_eval(tiny["data"], tiny["ckpt"], tokens_per_sample=64, context_window=48,
                            devices=jax.devices()[:1])[1].token_logprobs
    for path in (tmp_path / "run", tmp_path / "run" / "7", tmp_path / "other"):
        got = eval_lm.run_eval(tiny["data"], path, tokens_per_sample=64, context_window=48,
                               devices=jax.devices()[:1])[1].token_logprobs
        np.testing.assert_array_equal(got, want)

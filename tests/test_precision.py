"""Precision policies: fairseq's dynamic loss scaler (against a numpy transcription of its source), the
memory-efficient Adam step (against fairseq's memory-efficient update), the overflow skip inside the jitted
step, and the fp16 CLI: exact resume with the scale sequence, the minimum-scale stop, eval of the checkpoint."""

import json
import math
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m11b_jax import checkpoint as ckpt
from m11b_jax import sharding as S
from m11b_jax.config import load_config
from m11b_jax.errors import UserError
from m11b_jax.optim import FairseqAdamState, fairseq_adam_apply
from m11b_jax.precision import (LossScaleConfig, default_scale_window, init_loss_scale, policy_from_flags,
                                update_loss_scale, warn_if_fp16_on_tpu)
from m11b_jax.train import run
from m11b_jax.train_step import OptimConfig, batch_shardings, init_train_state, make_train_step
from train_fixtures import base_args, run_cli, shared_databin


class NumpyFairseqScaler:
    """fairseq/optim/dynamic_loss_scaler.py's DynamicLossScaler, transcribed (Python floats, as fairseq)."""

    def __init__(self, init_scale, scale_factor, scale_window, tolerance, threshold, min_loss_scale):
        self.loss_scale, self.scale_factor, self.scale_window = init_scale, scale_factor, scale_window
        self.tolerance, self.threshold, self.min_loss_scale = tolerance, threshold, min_loss_scale
        self._iter, self._last_overflow_iter, self._last_rescale_iter, self._overflows_since_rescale = 0, -1, -1, 0

    def update(self):  # after a good step
        if (self._iter - self._last_overflow_iter) % self.scale_window == 0:
            self.loss_scale *= self.scale_factor
            self._last_rescale_iter = self._iter
        self._iter += 1

    def check_overflow(self, grad_norm):  # raises OverflowError / FloatingPointError like fairseq
        if grad_norm == float("inf") or grad_norm != grad_norm:
            prev_scale = self.loss_scale
            iter_since_rescale = self._iter - self._last_rescale_iter
            if iter_since_rescale == 0:
                iter_since_rescale = 1000
            self._last_overflow_iter = self._iter
            self._overflows_since_rescale += 1
            if self._overflows_since_rescale / float(iter_since_rescale) >= self.tolerance:
                self.loss_scale /= self.scale_factor
                if self.threshold is not None:
                    self.loss_scale = max(self.loss_scale, self.threshold)
                self._last_rescale_iter = self._iter
                self._overflows_since_rescale = 0
            if self.loss_scale <= self.min_loss_scale:
                self.loss_scale = prev_scale
                raise FloatingPointError("Minimum loss scale reached")
            self._iter += 1
            raise OverflowError("setting loss scale to: " + str(self.loss_scale))


@pytest.mark.parametrize("cfg, script", [
    # window and plain halving; the sequence ends when the minimum is reached
    (LossScaleConfig(init_scale=8.0, scale_window=3, min_scale=0.5), "..x....x.x..xx.......xxxxxxxxxxxx"),
    # tolerance: the share of overflows since the last rescale must reach 0.25 before the scale drops
    (LossScaleConfig(init_scale=128.0, scale_window=4, tolerance=0.25), "x...x.x..xx........x.x.xx.x..x...xx"),
    # threshold: never below 3.0 (not a power of two), growth after it
    (LossScaleConfig(init_scale=16.0, scale_window=2, threshold=3.0), "xxxxx..x.xxx....x.xxxxx...."),
    # fairseq's default window for 8 data-parallel devices and update_freq 1: 2048
    (LossScaleConfig(init_scale=128.0, scale_window=default_scale_window(8, 1)), "x" + "." * 2050 + "x."),
])
def test_loss_scaler_matches_fairseq_transcription(cfg, script):
    ref = NumpyFairseqScaler(cfg.init_scale, cfg.factor, cfg.scale_window, cfg.tolerance, cfg.threshold,
                             cfg.min_scale)

    def body(s, is_overflow):
        s, overflow, min_reached = update_loss_scale(cfg, s, jnp.where(is_overflow, jnp.inf, 1.0))
        return s, (s.scale, overflow, min_reached)

    overflows = jnp.asarray([c == "x" for c in script])
    _, out = jax.jit(lambda s, xs: jax.lax.scan(body, s, xs))(init_loss_scale(cfg), overflows)
    scales, flags, mins = (np.asarray(x) for x in out)
    seen = set()
    for i, c in enumerate(script):
        try:
            ref.check_overflow(math.inf if c == "x" else 1.0)
            ref.update()
            assert not flags[i]
        except OverflowError:
            assert flags[i] and not mins[i]
        except FloatingPointError:
            assert mins[i], f"step {i}: fairseq stops here"
            assert float(scales[i]) == ref.loss_scale  # the scale before the failed decrease
            seen.add("min")
            break
        assert not mins[i]
        np.testing.assert_allclose(float(scales[i]), ref.loss_scale, rtol=1e-7, err_msg=f"step {i} ({script[:i + 1]})")
        seen.add("down" if c == "x" else "up")
    assert {"down", "up"} <= seen  # each script exercises both directions
    if cfg.min_scale == 0.5:
        assert "min" in seen


def test_precision_flags_and_tpu_warning():
    assert policy_from_flags(True, True, False, False) == "memory_efficient_fp16"  # fairseq: memory-efficient wins
    assert policy_from_flags(False, False, True, False) == "bf16"
    assert policy_from_flags(False, False, False, False) == "fp32"
    with pytest.raises(UserError, match="--fp16 and --memory-efficient-bf16 ask for two precisions"):
        policy_from_flags(True, False, False, True)
    assert "use --bf16" in warn_if_fp16_on_tpu("fp16", "tpu")
    assert "use --memory-efficient-bf16" in warn_if_fp16_on_tpu("memory_efficient_fp16", "tpu")
    assert warn_if_fp16_on_tpu("fp16", "gpu") is None and warn_if_fp16_on_tpu("bf16", "tpu") is None


def numpy_memory_efficient_adam(p16, g16, m, v, t, lr, b1, b2, eps, wd, grad_mult):
    """fairseq/optim/adam.py's step on a 16-bit parameter (memory-efficient fp16): fp32 copies of the parameter
    and the (unscaled) gradient, fp32 moments, weight decay then the Adam term, written back as fp16."""
    f32 = np.float32
    p = p16.astype(f32)
    g = g16.astype(f32) * f32(grad_mult)
    m = f32(b1) * m + f32(1 - b1) * g
    v = f32(b2) * v + f32(1 - b2) * (g * g)
    denom = np.sqrt(v) + f32(eps)
    step_size = f32(lr) * np.sqrt(f32(1) - f32(b2) ** f32(t)) / (f32(1) - f32(b1) ** f32(t))
    p = p + f32(-wd * lr) * p
    p = p - step_size * (m / denom)
    return p.astype(p16.dtype), m, v


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_memory_efficient_adam_step_matches_fairseq(dtype):
    rng = np.random.default_rng(0)
    shape = (64, 48)
    p16 = rng.normal(size=shape).astype(dtype)
    m0 = (rng.normal(size=shape) * 1e-3).astype(np.float32)
    v0 = (rng.random(size=shape) * 1e-6).astype(np.float32)
    g16 = (rng.normal(size=shape) * 300.0).astype(dtype)  # scaled gradients, as the backward pass leaves them
    lr, b1, b2, eps, wd, mult = 1e-2, 0.9, 0.98, 1e-8, 0.01, 1.0 / 1024
    state = FairseqAdamState(jnp.asarray(4, jnp.int32), {"w": jnp.asarray(m0)}, {"w": jnp.asarray(v0)})
    new, st = jax.jit(lambda p, g, s: fairseq_adam_apply(p, g, s, lr, b1, b2, eps, wd, grad_scale=mult))(
        {"w": jnp.asarray(p16)}, {"w": jnp.asarray(g16)}, state)
    want_p, want_m, want_v = numpy_memory_efficient_adam(p16, g16, m0, v0, 5, lr, b1, b2, eps, wd, mult)
    assert new["w"].dtype == dtype and st.mu["w"].dtype == jnp.float32 and int(st.count) == 5
    # fp32 moments (XLA may fuse a multiply-add where numpy rounds twice: allow a few fp32 ulps of the terms).
    np.testing.assert_allclose(np.asarray(st.mu["w"]), want_m, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(st.nu["w"]), want_v, rtol=1e-6, atol=1e-12)
    got = np.asarray(new["w"]).astype(np.float32)
    want = want_p.astype(np.float32)
    # fp32 math cast to 16 bits: equal, except where fp32 rounding differences (pow) land on a rounding boundary.
    assert np.mean(got == want) > 0.999, np.mean(got == want)
    ulp = np.abs(np.asarray(want_p).astype(np.float32)) * float(jnp.finfo(dtype).eps)
    assert np.all(np.abs(got - want) <= ulp + 1e-12)
    assert np.mean(got != p16.astype(np.float32)) > 0.5  # the step moved the 16-bit parameters


def test_injected_overflow_changes_nothing_but_the_scale():
    """A loss scale of 2^100 makes every fp16 gradient infinite: the step keeps parameters, Adam state and the
    update count, halves the scale; with a normal scale the next steps update."""
    cfg = load_config("tiny", param_dtype="float16", compute_dtype="float16", dropout=0.0, attention_dropout=0.0)
    mesh, rules = S.make_mesh(2), S.logical_rules()
    ocfg = OptimConfig(lr=1e-3, warmup_updates=0)
    scaler = LossScaleConfig(init_scale=2.0 ** 100, scale_window=1000)
    state = init_train_state(cfg, mesh, rules, ocfg, loss_scale=scaler)
    step = make_train_step(cfg, mesh, rules, ocfg, loss_scale=scaler, donate=False)
    rng = np.random.default_rng(0)
    toks = rng.integers(4, cfg.vocab_size, size=(1, 8, 33))
    bs = batch_shardings(mesh, rules)
    batch = {"source": jax.device_put(toks[:, :, :-1], bs["source"]),
             "target": jax.device_put(toks[:, :, 1:], bs["target"])}
    before = jax.device_get(state)
    after, m = step(state, batch)
    after_h = jax.device_get(after)
    assert float(m["overflow"]) == 1.0 and not math.isfinite(float(m["gnorm"])) and int(m["update"]) == 0
    assert int(after_h.step) == 0 and int(after_h.opt_state.count) == 0
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state)), jax.tree.leaves((after_h.params, after_h.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert float(after_h.loss_scale.scale) == 2.0 ** 99 and float(m["loss_scale"]) == 2.0 ** 99

    normal = after.replace(loss_scale=after.loss_scale.replace(scale=jnp.asarray(128.0)))
    s1, m1 = step(normal, batch)
    s2, m2 = step(s1, batch)
    assert [float(m1["overflow"]), float(m2["overflow"])] == [0.0, 0.0]
    assert [int(m1["update"]), int(m2["update"])] == [1, 2] and float(m2["loss"]) < float(m1["loss"])
    p0, p2 = jax.tree.leaves(before.params), jax.tree.leaves(jax.device_get(s2.params))
    s3, m3 = step(s2, batch)  # memory-efficient fp16 trains: the loss keeps falling, fp16 parameters stay finite
    assert float(m3["overflow"]) == 0.0 and float(m3["loss"]) < float(m2["loss"])
    assert all(a.dtype == jnp.float16 and np.isfinite(a).all() for a in p2)
    assert any(not np.array_equal(a, b) for a, b in zip(p0, p2))
    p3 = jax.tree.leaves(jax.device_get(s3.params))
    assert all(a.dtype == jnp.float16 and np.isfinite(a).all() for a in p3)
    assert float(m2["loss_scale"]) == 128.0


@pytest.mark.parametrize("flags, message", [
    (["--fp16", "--bf16"], "--fp16 and --bf16 ask for two precisions"),
    (["--memory-efficient-fp16", "--memory-efficient-bf16"],
     "--memory-efficient-fp16 and --memory-efficient-bf16 ask for two precisions"),
])
def test_fp16_and_bf16_together_is_a_one_line_cli_error(flags, message, capsys):
    from m11b_jax.train import main

    with pytest.raises(SystemExit) as e:
        main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}: give the fp16 flags or the bf16 flags, not both") and "\n" not in err


def test_fp16_on_a_tpu_warns_at_training_start_and_names_bf16(data, tmp_path, monkeypatch, capsys):
    """The trainer's start on a (pretended) TPU backend prints the one-line warning naming --bf16 (the CPU and
    bf16 cases: test_precision_flags_and_tpu_warning)."""
    from m11b_jax.train import parse_args
    from m11b_jax.trainer import Trainer

    capsys.readouterr()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    Trainer(parse_args(base_args(data, tmp_path / "tpu", "--fp16", "--disable-validation", max_update=1)))
    err = capsys.readouterr().err
    assert "| warning: --fp16 on a TPU: TPUs have no fast float16 matmuls; use --bf16" in err, err


@pytest.fixture(scope="module")
def data():
    return shared_databin()


def _records(save):
    return [json.loads(x) for x in (save / "train_log.jsonl").read_text().splitlines()]


# --memory-efficient-fp16 with a high initial scale and a 2-update window (the runs below share one compiled step).
ME_FP16_FLAGS = ["--memory-efficient-fp16", "--fp16-init-scale", "65536", "--fp16-scale-window", "2",
                 "--disable-validation"]


def test_fp16_resume_after_sigkill_continues_losses_and_scales_exactly(data, tmp_path):
    """--memory-efficient-fp16 with a high initial scale and a 2-update window (overflows, then growth and more
    overflows): killed while update 4 is being saved, resumed from 2; per-update losses and loss scales equal
    an uninterrupted run's, and the checkpoint evaluates with eval_lm."""
    flags = ME_FP16_FLAGS
    save = tmp_path / "run"
    args = base_args(data, save, "--save-interval-updates", "2", *flags)
    killed = run_cli(args, M11B_TEST_KILL_DURING_SAVE="4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert ckpt.list_steps(save) == [2]
    meta = ckpt.read_meta(save, 2)
    assert meta["precision"] == "memory_efficient_fp16" and meta["model_config"]["param_dtype"] == "float16"
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ckpt.list_steps(save) == [2, 4, 6]

    straight = run(base_args(data, tmp_path / "straight", *flags))
    assert straight.overflows, "the initial scale should overflow"
    got_loss, got_scale = {}, {}
    for r in _records(save):
        if "loss" in r:
            got_loss[r["update"]], got_scale[r["update"]] = r["loss"], r["loss_scale"]
    assert sorted(got_loss) == [1, 2, 3, 4, 5, 6]
    for u in range(1, 7):
        assert abs(got_loss[u] - straight.losses[u]) <= 1e-6, (u, got_loss[u], straight.losses[u])
        assert got_scale[u] == straight.loss_scales[u], (u, got_scale, straight.loss_scales)
    assert len(set(got_scale.values())) > 1  # the scale moved during the run
    # Overflow records (update count unchanged, scale halved) in the log, the same ones in both runs.
    straight_overflows = [(r["update"], r["loss_scale"]) for r in _records(tmp_path / "straight") if r.get("overflow")]
    assert straight_overflows and all(s < 65536 for _, s in straight_overflows)

    from m11b_jax import params_io

    # eval_lm's loader reads the fp16 training checkpoint (16-bit parameters and a loss scaler in its state) in fp32.
    cfg, params, _ = params_io.load_checkpoint(save, S.make_mesh(2), S.logical_rules(), "float32")
    leaves = jax.tree.leaves(jax.device_get(params))
    assert cfg.param_dtype == "float32" and all(x.dtype == np.float32 and np.isfinite(x).all() for x in leaves)
    assert all(np.array_equal(x.astype(np.float16).astype(np.float32), x) for x in leaves)  # the stored fp16 values


def test_fp16_minimum_loss_scale_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    """The NaN test's setup in --fp16: update 1 throws the weights to ~1e30 (inf in fp16), every later step
    overflows, the scale halves 128 -> 64 -> 32 = --min-loss-scale: a one-line error, checkpoint 1 kept."""
    save = tmp_path / "run"
    args = base_args(data, save, "--save-interval-updates", "1", "--disable-validation", "--fp16",
                     "--min-loss-scale", "32", max_update=5)
    args[args.index("--lr") + 1] = "1e30"
    args[args.index("--warmup-updates") + 1] = "0"
    with pytest.raises(UserError, match=r"^minimum loss scale reached \(--min-loss-scale 32\) after update 1: the loss "
                                        r"is probably exploding; training stopped; the last verified checkpoint is "
                                        r".*/1; lower --lr") as e:
        run(args)
    assert "\n" not in str(e.value)
    assert ckpt.list_steps(save) == [1]
    overflow_scales = [r["loss_scale"] for r in _records(save) if r.get("overflow")]
    assert overflow_scales == [64.0]


def test_fused_and_vocab_parallel_losses_with_float16_and_a_loss_scale():
    """float16 operands, gradients of scale x loss (the fp16 backward): the fused loss and the vocab-parallel loss
    equal the fp32 loss of the same fp16 values, and their unscaled gradients match it to fp16 precision."""
    from m11b_jax.loss import cross_entropy, output_cross_entropy, vocab_parallel_cross_entropy

    rng = np.random.default_rng(3)
    n, d, v, scale = 96, 32, 256, 1024.0
    hidden = jnp.asarray(rng.normal(size=(n, d)) * 2.0, jnp.float16)
    embed = jnp.asarray(rng.normal(size=(v, d)) * 0.5, jnp.float16)
    targets = jnp.asarray(rng.integers(0, v, size=n))
    targets = targets.at[:5].set(1)  # a few pads
    h32, e32 = hidden.astype(jnp.float32), embed.astype(jnp.float32)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(lambda h, e: cross_entropy(h @ e.T, targets, 1)[0], (0, 1)))(
        h32, e32)

    value, grads = jax.jit(jax.value_and_grad(lambda h, e: scale * output_cross_entropy(h, e, targets, 1)[0], (0, 1)))(
        hidden, embed)
    assert grads[0].dtype == grads[1].dtype == jnp.float16
    np.testing.assert_allclose(value / scale, ref_value, rtol=2e-3)
    for got, want in zip(grads, ref_grads):
        got = np.asarray(got, np.float32) / scale
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-3 * float(jnp.abs(want).max()))

    mesh = S.make_mesh(2)  # the vocabulary split over a model axis of 2
    logits16 = (hidden @ embed.T).reshape(8, 12, v)  # fp16 logits, as the model hands them to the criterion
    t2 = targets.reshape(8, 12)
    l32 = logits16.astype(jnp.float32)
    ref_l, ref_g = jax.jit(jax.value_and_grad(lambda x: cross_entropy(x, t2, 1)[0]))(l32)
    rules = S.logical_rules()
    got_l, got_g = jax.jit(jax.value_and_grad(
        lambda x: scale * vocab_parallel_cross_entropy(x, t2, mesh, rules, 1)[0]))(logits16)
    assert got_g.dtype == jnp.float16
    np.testing.assert_allclose(got_l / scale, ref_l, rtol=1e-5)  # the loss itself is fp32 inside
    np.testing.assert_allclose(np.asarray(got_g, np.float32) / scale, ref_g, rtol=0, atol=2e-3)


def test_memory_efficient_fp16_checkpoint_loads_in_eval_generate_and_hf_export(data, tmp_path, capsys):
    """A checkpoint trained with --memory-efficient-fp16 (fp16 parameters and a loss scaler in its train state):
    eval_lm, LanguageModel.load / the generate CLI and the XGLM export all read it, as the stored fp16 values in
    fp32, and the export's logits equal ours."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from m11b_jax import eval_lm, hf, params_io
    from m11b_jax import generate as generate_cli
    from m11b_jax.api import LanguageModel
    from m11b_jax.model import TransformerLM
    save = tmp_path / "save"
    trained = run(base_args(data, save, *ME_FP16_FLAGS, max_update=2))
    meta = ckpt.read_meta(save, 2)
    assert meta["precision"] == "memory_efficient_fp16" and meta["model_config"]["param_dtype"] == "float16"
    mesh, rules = S.make_mesh(2), S.logical_rules()
    cfg, params, _ = params_io.load_checkpoint(save, mesh, rules, "float32")
    params = jax.device_get(params)
    leaves = jax.tree.leaves(params)
    assert all(x.dtype == np.float32 and np.isfinite(x).all() for x in leaves)
    assert all(np.array_equal(x.astype(np.float16).astype(np.float32), x) for x in leaves)  # the stored fp16 values

    summary, _ = eval_lm.run_eval(data, save, split="valid", tokens_per_sample=32, context_window=16,
                                  model_parallel_size=2)
    # finite, and near the training loss (base 2) of this barely trained model
    assert abs(summary["loss_base2"] - trained.losses[2]) < 1.5, (summary, trained.losses)

    lm = LanguageModel.load(save, model_parallel_size=2)
    for a, b in zip(leaves, jax.tree.leaves(jax.device_get(lm.params))):
        np.testing.assert_array_equal(a, b)
    prompt = [2, 10, 11, 12, 13]
    want = lm.generate([prompt], max_new_tokens=4, return_ids=True)[0]
    (tmp_path / "prompts").write_text(" ".join(map(str, prompt)) + "\n")
    capsys.readouterr()
    generate_cli.main(["--path", str(save), "--input", str(tmp_path / "prompts"), "--prompt-ids",
                       "--max-new-tokens", "4", "--model-parallel-size", "2", "--json"])
    got = json.loads(capsys.readouterr().out.strip())
    assert got["tokens"] == want.tokens and 1 <= len(got["tokens"]) <= 4 and math.isfinite(got["logprob"])

    hf.export_hf(save, tmp_path / "hf", log=lambda msg: None)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="numpy") as f:
        for k, v in hf.state_dict_from_params(params, cfg).items():
            np.testing.assert_array_equal(np.asarray(f.get_tensor(k), np.float32), v, err_msg=k)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    tokens = np.asarray([prompt + [20, 21, 22]], np.int32)
    ours = np.asarray(TransformerLM(cfg.replace(dropout=0.0, attention_dropout=0.0)).apply({"params": params},
                                                                                          jnp.asarray(tokens)))
    with torch.no_grad():
        ref = model.eval()(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

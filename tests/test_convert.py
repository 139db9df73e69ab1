"""The fairseq -> ours -> fairseq converter, our params checkpoint format, and the converter's refusals.

Synthetic release-layout checkpoints (tests/fairseq_fixtures.py): tiny dims, 8 shards, fp16 by default,
both PyTorch serialization formats, an `args` Namespace with fairseq's option names.
"""

from __future__ import annotations

import builtins
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import fairseq_fixtures as ff
from m11b_jax import params_io
from m11b_jax.convert import convert_fairseq, export_fairseq, verify_checkpoint, verify_tokens
from m11b_jax.dictionary import Dictionary
from m11b_jax.errors import UserError
from m11b_jax.fairseq_io import load_shard
from m11b_jax.fairseq_layout import to_fairseq_state_dict
from m11b_jax.model import TransformerLM
from m11b_jax.sharding import activate, logical_rules, make_mesh
from m11b_jax.textio import default_file_mode
from xglm_reference import xglm_from_fairseq_state, xglm_logits

REPO = pathlib.Path(__file__).resolve().parent.parent
DIMS = dict(d=32, ffn=64, layers=2, heads=8)
VOCAB, DICT_LINES, MP = 128, 121, 8  # 4 + 121 = 125 symbols, padded by fairseq to 128 (a multiple of 8 x 8)


def rounded(merged, dtype):
    """The merged fp32 weights as they come back from shards stored in `dtype`."""
    return {k: torch.from_numpy(v).to(dtype).float().numpy() for k, v in merged.items()}


def host_params(path, devices=1):
    mesh = make_mesh(1, jax.devices()[:devices])
    return jax.device_get(params_io.load_params(path, mesh, logical_rules()))


def assert_same_weights(params, merged, num_layers):
    got = to_fairseq_state_dict(params, num_layers)
    assert set(got) == set(merged)
    for key, value in merged.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.fixture(scope="module")
def merged():
    return ff.merged_state(VOCAB, DIMS["d"], DIMS["ffn"], DIMS["layers"], seed=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory, merged):
    """fp16 shards in PyTorch's legacy serialization, as the 2020 release."""
    return ff.write_release(tmp_path_factory.mktemp("release") / "megatron", merged, **DIMS, dict_lines=DICT_LINES)


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def converted(tmp_path_factory, release):
    """The release converted with the defaults (float32 storage)."""
    out = tmp_path_factory.mktemp("conv") / "ckpt"
    convert_fairseq(release, out, log=quiet)
    return out


@pytest.fixture(scope="module")
def converted16(tmp_path_factory, release):
    out = tmp_path_factory.mktemp("conv16") / "ckpt"
    convert_fairseq(release, out, dtype="float16", log=quiet)
    return out


# ---- fairseq -> ours ------------------------------------------------------------------------------


def test_converted_logits_match_xglm(converted, merged):
    cfg = params_io.load_model_config(converted)
    assert (cfg.vocab_size, cfg.d_model, cfg.ffn_dim, cfg.num_layers, cfg.num_heads) == (VOCAB, 32, 64, 2, 8)
    assert cfg.max_positions == 64 and cfg.name == "transformer_lm_megatron"
    mesh, rules = make_mesh(MP), logical_rules()
    params = params_io.load_params(converted, mesh, rules)
    rng = np.random.default_rng(1)
    tokens = rng.integers(4, VOCAB, size=(3, 12)).astype(np.int32)
    tokens[1, -3:] = 1  # right padding
    tokens[2, :2] = 1  # left padding
    with activate(mesh, rules):
        ours = np.asarray(jax.jit(lambda p, t: TransformerLM(cfg).apply({"params": p}, t))(params, tokens))
    ref = xglm_logits(xglm_from_fairseq_state(rounded(merged, torch.float16), cfg), tokens)
    real = tokens != 1
    assert np.abs(ref[real]).max() > 0.1  # not a trivially small output
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)


def test_converted_weights_are_the_merged_shards(converted, merged, release):
    assert_same_weights(host_params(converted), rounded(merged, torch.float16), DIMS["layers"])
    assert (converted / "dict.txt").read_bytes() == (release / "dict.txt").read_bytes()
    assert converted.stat().st_mode & 0o777 == default_file_mode(directory=True)  # not mkdtemp's 0700


@pytest.mark.parametrize("legacy,dtype", [(False, torch.float32), (False, torch.bfloat16), (True, torch.bfloat16)])
def test_formats_and_dtypes(tmp_path, merged, legacy, dtype):
    src = ff.write_release(tmp_path / "src", merged, **DIMS, dtype=dtype, legacy=legacy, dict_lines=DICT_LINES)
    convert_fairseq(src, tmp_path / "out", log=quiet)
    assert_same_weights(host_params(tmp_path / "out"), rounded(merged, dtype), DIMS["layers"])


def test_path_style_source_and_single_file(tmp_path, merged):
    # fairseq's --path DIR/checkpoint_best.pt meaning DIR/checkpoint_best-model_part-{r}.pt
    src = ff.write_release(tmp_path / "parts", merged, **DIMS, dict_lines=DICT_LINES, stem="checkpoint_best")
    convert_fairseq(src / "checkpoint_best.pt", tmp_path / "a", log=quiet)
    # one non-sharded model.pt (model_parallel_size 1; fairseq pads the dictionary to a multiple of 8)
    one = ff.write_release(tmp_path / "one", merged, **DIMS, mp=1, dict_lines=DICT_LINES,
                           args=ff.fairseq_args(**{k: DIMS[k] for k in ("d", "ffn", "layers", "heads")}, mp=1))
    convert_fairseq(one / "model.pt", tmp_path / "b", log=quiet)
    expected = rounded(merged, torch.float16)
    assert_same_weights(host_params(tmp_path / "a"), expected, DIMS["layers"])
    assert_same_weights(host_params(tmp_path / "b"), expected, DIMS["layers"])


def test_cfg_style_checkpoint(tmp_path, merged):
    """Newer fairseq stores `cfg` (a dict with model/task/common sections) and `args` None."""
    args = vars(ff.fairseq_args(**{k: DIMS[k] for k in ("d", "ffn", "layers", "heads")}, mp=MP))
    model = {k: v for k, v in args.items() if k not in ("model_parallel_size", "tokens_per_sample", "arch")}
    cfg = {"common": {"model_parallel_size": MP}, "task": {"_name": "language_modeling", "tokens_per_sample": 64},
           "model": {**model, "_name": "transformer_lm_megatron"}}
    src = tmp_path / "src"
    ff.write_release(src, merged, **DIMS, dict_lines=DICT_LINES)
    for f in sorted(src.glob("*.pt")):
        state = load_shard(f)
        state["args"], state["cfg"] = None, cfg
        torch.save(dict(state), f)
    convert_fairseq(src, tmp_path / "out", log=quiet)
    assert_same_weights(host_params(tmp_path / "out"), rounded(merged, torch.float16), DIMS["layers"])


def test_missing_version_keeps_final_layer_norm(tmp_path, merged):
    states = ff.shard_states(merged, MP)
    for sd in states:
        del sd["decoder.version"]
    logs = []
    src = ff.write_release(tmp_path / "src", merged, **DIMS, dict_lines=DICT_LINES, model_states=states)
    convert_fairseq(src, tmp_path / "out", log=logs.append)
    assert any("decoder.version" in m and "final LayerNorm" in m for m in logs)
    params = host_params(tmp_path / "out")
    np.testing.assert_array_equal(params["layer_norm"]["scale"], rounded(merged, torch.float16)["decoder.layer_norm.weight"])


# ---- restoring on meshes -------------------------------------------------------------------------


@pytest.mark.parametrize("data,model", [(1, 8), (2, 4), (1, 1)])
def test_restores_on_meshes(converted, merged, data, model):
    mesh = make_mesh(model, jax.devices()[:data * model])
    params = params_io.load_params(converted, mesh, logical_rules())
    assert dict(mesh.shape) == {"data": data, "model": model}
    kernel = params["layers"]["fc1"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh.shape and kernel.sharding.spec == P(None, None, "model")
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 32, 64 // model)}
    assert params["embed_tokens"].sharding.spec[0] == "model"
    assert_same_weights(jax.device_get(params), rounded(merged, torch.float16), DIMS["layers"])


def test_restore_casts_dtype(converted16, merged):
    params = params_io.load_params(converted16, make_mesh(2, jax.devices()[:2]), logical_rules())
    assert params["embed_tokens"].dtype == jnp.float32  # the config's param_dtype, from fp16 storage
    as_bf16 = params_io.load_params(converted16, make_mesh(2, jax.devices()[:2]), logical_rules(), dtype=jnp.bfloat16)
    assert as_bf16["layers"]["fc2"]["kernel"].dtype == jnp.bfloat16
    assert_same_weights(jax.device_get(params), rounded(merged, torch.float16), DIMS["layers"])


def test_save_params_round_trip(tmp_path, converted):
    cfg = params_io.load_model_config(converted)
    mesh = make_mesh(4)  # (2, 4): replicas over data are written once
    params = params_io.load_params(converted, mesh, logical_rules())
    params_io.save_params(params, tmp_path / "saved", cfg, params_io.dictionary_path(converted))
    again = params_io.load_params(tmp_path / "saved", make_mesh(8), logical_rules())
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), jax.device_get(params))
    assert params_io.load_model_config(tmp_path / "saved") == cfg
    assert (tmp_path / "saved" / "dict.txt").is_file()


def test_corrupt_checkpoints_are_clear_errors(tmp_path, converted):
    mesh, rules = make_mesh(MP), logical_rules()
    with pytest.raises(UserError, match="not an m11b_jax params checkpoint"):
        params_io.load_params(tmp_path, mesh, rules)
    with pytest.raises(UserError, match="not a directory"):
        params_io.load_params(tmp_path / "nope", mesh, rules)
    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    chunk = next((broken / "params" / "layers.fc2.kernel").rglob("c/*/*/*"))
    chunk.unlink()
    with pytest.raises(UserError, match="layers.fc2.kernel.*incomplete or corrupt"):
        params_io.load_params(broken, mesh, rules)
    cfg = params_io.load_model_config(converted)
    with pytest.raises(UserError, match="has shape"):
        params_io.load_params(converted, mesh, rules, cfg=cfg.replace(ffn_dim=128))


# ---- ours -> fairseq -----------------------------------------------------------------------------


def test_round_trip_to_fairseq_is_exact(tmp_path, release, converted16, converted):
    export_fairseq(converted16, tmp_path / "back", MP, log=quiet)
    export_fairseq(converted, tmp_path / "back32", MP, dtype="float16", log=quiet)
    for r in range(MP):
        name = f"model-model_part-{r}.pt"
        original = load_shard(release / name)
        for back in ("back", "back32"):
            shard = load_shard(tmp_path / back / name)
            assert list(shard["model"]) == list(original["model"])  # same keys, same order
            for key, t in original["model"].items():
                if key.endswith("_float_tensor"):
                    continue
                assert shard["model"][key].dtype == t.dtype and torch.equal(shard["model"][key], t), key
            a = shard["args"]
            assert (a.arch, a.model_parallel_size, a.decoder_layers, a.decoder_embed_dim) == \
                ("transformer_lm_megatron", MP, 2, 32)
            assert a.share_decoder_input_output_embed and not a.decoder_learned_pos and a.activation_fn == "gelu"
            assert shard["optimizer_history"][-1]["num_updates"] == 0 and "train_iterator" in shard["extra_state"]
    assert (tmp_path / "back" / "dict.txt").read_bytes() == (release / "dict.txt").read_bytes()


def test_export_other_model_parallel_size_and_back(tmp_path, converted):
    export_fairseq(converted, tmp_path / "mp1", 1, log=quiet)  # fairseq pads 125 symbols to 128 (multiple of 8)
    assert sorted(p.name for p in (tmp_path / "mp1").iterdir()) == ["dict.txt", "model.pt"]
    export_fairseq(converted, tmp_path / "mp2", 2, dtype="bfloat16", legacy_format=True, log=quiet)
    assert load_shard(tmp_path / "mp2" / "model-model_part-1.pt")["model"]["decoder.layers.0.fc1.weight"].shape == (32, 32)
    convert_fairseq(tmp_path / "mp1", tmp_path / "again1", log=quiet)
    convert_fairseq(tmp_path / "mp2", tmp_path / "again2", dtype="bfloat16", log=quiet)
    original = host_params(converted)
    jax.tree.map(np.testing.assert_array_equal, host_params(tmp_path / "again1"), original)
    bf16 = jax.tree.map(lambda a: np.asarray(a, jnp.bfloat16).astype(np.float32), original)
    jax.tree.map(np.testing.assert_array_equal, host_params(tmp_path / "again2"), bf16)
    with pytest.raises(UserError, match="num_heads=8 is not divisible by the model-parallel size 3"):
        export_fairseq(converted, tmp_path / "mp3", 3, log=quiet)
    assert leftovers(tmp_path / "mp3") == []


# ---- refusals: each a one-line UserError, and no OUT ------------------------------------------------


def leftovers(out: pathlib.Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.tmp")]


def assert_refused(src, out, match, **kwargs):
    with pytest.raises(UserError, match=match) as e:
        convert_fairseq(src, out, log=quiet, **kwargs)
    assert "\n" not in str(e.value)
    assert leftovers(out) == []
    return str(e.value)


@pytest.fixture
def fresh(tmp_path, release):
    """A writable copy of the release directory."""
    return pathlib.Path(shutil.copytree(release, tmp_path / "src"))


def test_missing_shards(tmp_path, fresh):
    (fresh / "model-model_part-7.pt").unlink()
    assert_refused(fresh, tmp_path / "out", r"missing shard\(s\) model-model_part-7.pt.*model_parallel_size 8")
    (fresh / "model-model_part-3.pt").unlink()
    assert_refused(fresh, tmp_path / "out", r"missing shard\(s\) model-model_part-3.pt")


def test_extra_and_duplicated_ranks(tmp_path, fresh):
    shutil.copy(fresh / "model-model_part-2.pt", fresh / "model-model_part-8.pt")
    assert_refused(fresh, tmp_path / "out", r"extra shard\(s\) model-model_part-8.pt.*model_parallel_size 8")
    (fresh / "model-model_part-8.pt").rename(fresh / "model-model_part-02.pt")
    assert_refused(fresh, tmp_path / "out", "rank 2 appears twice")
    (fresh / "model-model_part-02.pt").unlink()
    shutil.copy(fresh / "model-model_part-1.pt", fresh / "model-model_part-3.pt")
    assert_refused(fresh, tmp_path / "out", "model-model_part-3.pt holds the same vocabulary block as rank 1")


def test_fewer_files_than_recorded_model_parallel_size(tmp_path, merged):
    src = ff.write_release(tmp_path / "src", merged, **DIMS, mp=4, dict_lines=DICT_LINES,
                           args=ff.fairseq_args(32, 64, 2, 8, mp=8))
    assert_refused(src, tmp_path / "out", r"missing shard\(s\) model-model_part-4.pt, .*records model_parallel_size 8")
    one = ff.write_release(tmp_path / "one", merged, **DIMS, mp=1, dict_lines=DICT_LINES,
                           args=ff.fairseq_args(32, 64, 2, 8, mp=2))
    assert_refused(one, tmp_path / "out", "model.pt is a single file but records model_parallel_size 2")


def test_shapes_disagree(tmp_path, merged):
    states = ff.shard_states(merged, MP)
    states[4]["decoder.layers.1.fc1.weight"] = torch.zeros(16, 32, dtype=torch.float16)
    src = ff.write_release(tmp_path / "src", merged, **DIMS, dict_lines=DICT_LINES, model_states=states)
    assert_refused(src, tmp_path / "out", r"model-model_part-4.pt: decoder.layers.1.fc1.weight has shape \[16, 32\].*\[8, 32\]")


def test_replicated_tensors_differ(tmp_path, merged):
    states = ff.shard_states(merged, MP)
    states[6]["decoder.layers.0.fc2.bias"][5] += 0.01
    src = ff.write_release(tmp_path / "src", merged, **DIMS, dict_lines=DICT_LINES, model_states=states)
    assert_refused(src, tmp_path / "out", "replicated tensor decoder.layers.0.fc2.bias differs between rank 0 and "
                                          "model-model_part-6.pt")


def test_unknown_and_missing_keys(tmp_path, merged):
    states = ff.shard_states(merged, MP)
    for sd in states:
        sd["decoder.layers.0.self_attn.rotary.inv_freq"] = torch.ones(4)
    src = ff.write_release(tmp_path / "a", merged, **DIMS, dict_lines=DICT_LINES, model_states=states)
    assert_refused(src, tmp_path / "out", "unknown keys decoder.layers.0.self_attn.rotary.inv_freq")
    states = ff.shard_states(merged, MP)
    for sd in states:
        del sd["decoder.layer_norm.weight"]
    src = ff.write_release(tmp_path / "b", merged, **DIMS, dict_lines=DICT_LINES, model_states=states)
    assert_refused(src, tmp_path / "out", "missing keys decoder.layer_norm.weight")


def test_stored_output_projection_must_be_tied(tmp_path, merged):
    """Newer fairseq also saves decoder.output_projection.weight: accepted when it is the embedding itself."""
    states = ff.shard_states(merged, MP)
    for sd in states:
        sd["decoder.output_projection.weight"] = sd["decoder.embed_tokens.weight"].clone()
    src = ff.write_release(tmp_path / "a", merged, **DIMS, dict_lines=DICT_LINES, model_states=states)
    convert_fairseq(src, tmp_path / "ok", log=quiet)
    assert_same_weights(host_params(tmp_path / "ok"), rounded(merged, torch.float16), DIMS["layers"])
    states[3]["decoder.output_projection.weight"][0, 0] += 1
    src = ff.write_release(tmp_path / "b", merged, **DIMS, dict_lines=DICT_LINES, model_states=states)
    assert_refused(src, tmp_path / "out", "model-model_part-3.pt: decoder.output_projection.weight differs from "
                                          "decoder.embed_tokens.weight: an untied output projection")


def test_old_version_refused(tmp_path, merged):
    states = ff.shard_states(merged, MP)
    for sd in states:
        sd["decoder.version"] = torch.tensor([2.0])
    src = ff.write_release(tmp_path / "src", merged, **DIMS, dict_lines=DICT_LINES, model_states=states)
    assert_refused(src, tmp_path / "out", r"decoder.version is 2 \(<= 2\).*final LayerNorm")


@pytest.mark.parametrize("legacy", [True, False])
def test_truncated_file(tmp_path, fresh, legacy, merged):
    if not legacy:
        shutil.rmtree(fresh)
        ff.write_release(fresh, merged, **DIMS, dict_lines=DICT_LINES, legacy=False)
    f = fresh / "model-model_part-2.pt"
    data = f.read_bytes()
    for cut in (0.5, 0.98):
        f.write_bytes(data[: int(len(data) * cut)])
        assert_refused(fresh, tmp_path / "out", "model-model_part-2.pt is truncated or corrupt")


class _Shell:
    """Pickles as `os.system(command)`: unpickling it runs the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Exec:
    """Pickles as `exec(code)`."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


@pytest.mark.parametrize("legacy", [True, False])
def test_malicious_pickle_never_runs(tmp_path, fresh, legacy):
    marker = tmp_path / "PWNED"
    payloads = {"os.system": _Shell(f"touch {shlex.quote(str(marker))}"),
                "exec": _Exec(f"open({str(marker)!r}, 'w').write('x')")}
    state = load_shard(fresh / "model-model_part-0.pt")
    for name, payload in payloads.items():
        state["extra_state"]["payload"] = payload
        evil = fresh / "model-model_part-0.pt"
        torch.save(dict(state), evil, _use_new_zipfile_serialization=not legacy)
        # Control: an unrestricted load does run it, so the marker below really detects execution.
        control = tmp_path / "control.pt"
        shutil.copy(evil, control)
        torch.load(control, weights_only=False)
        assert marker.exists(), f"the {name} payload is not live"
        marker.unlink()
        message = assert_refused(fresh, tmp_path / "out", f"refused .*model-model_part-0.pt.*(system|exec)")
        assert not marker.exists(), f"the {name} payload ran"
        assert "global" in message


def test_missing_dict(tmp_path, fresh):
    (fresh / "dict.txt").unlink()
    assert_refused(fresh, tmp_path / "out", "dictionary not found: .*dict.txt")


def test_dictionary_size_differs(tmp_path, fresh):
    ff.write_dict(fresh / "dict.txt", 200)  # 204 symbols -> padded to 256, embedding has 128 rows
    assert_refused(fresh, tmp_path / "out", "has 204 symbols .* pads to 256 .* embedding has 128 rows")


@pytest.mark.parametrize("change,match", [
    (dict(arch="lstm_lm"), "architecture 'lstm_lm' is not a fairseq transformer_lm"),
    (dict(arch="transformer"), "architecture 'transformer' is not a fairseq transformer_lm"),
    (dict(decoder_learned_pos=True), r"learned positions \(--decoder-learned-pos\)"),
    (dict(share_decoder_input_output_embed=False), "untied output embedding"),
    (dict(no_decoder_final_norm=True), "no final LayerNorm"),
    (dict(activation_fn="relu"), "activation_fn='relu'"),
])
def test_other_architectures_refused(tmp_path, merged, change, match):
    args = ff.fairseq_args(32, 64, 2, 8, mp=MP)
    vars(args).update(change)
    src = ff.write_release(tmp_path / "src", merged, **DIMS, dict_lines=DICT_LINES, args=args)
    assert_refused(src, tmp_path / "out", match)


def test_existing_output_untouched(tmp_path, release):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        convert_fairseq(release, out, log=quiet)
    assert (out / "keep").read_text() == "mine"


# ---- --verify ---------------------------------------------------------------------------------------


def test_verify_reports_the_reference_loss(converted, merged):
    """The figures --verify prints are XGLM's losses on the same tokens; random weights are not 'sane'."""
    report = verify_checkpoint(converted, strict=False, log=quiet)
    assert report["finite"] and report["mesh"] == {"data": 1, "model": 8} and not report["sane"]
    cfg = params_io.load_model_config(converted)
    tokens, k = verify_tokens(Dictionary.load(converted / "dict.txt"), cfg.max_positions)
    assert k == 31 and list(tokens[1:5]) == [4, 5, 6, 7]  # max_positions 64 fits 1 + 2 x 31 tokens
    logits = torch.from_numpy(xglm_logits(xglm_from_fairseq_state(rounded(merged, torch.float16), cfg), tokens[None]))
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], torch.from_numpy(tokens[1:]).long(), reduction="none")
    assert report["loss_first"] == pytest.approx(nll[:k].mean().item(), abs=1e-4)
    assert report["loss_repeat"] == pytest.approx(nll[k:].mean().item(), abs=1e-4)
    assert report["uniform"] == pytest.approx(np.log(VOCAB))


def test_verify_refuses_non_finite(tmp_path, merged):
    bad = dict(merged)
    bad["decoder.layers.1.fc2.weight"] = merged["decoder.layers.1.fc2.weight"] * 1e6  # overflows fp16 to inf
    src = ff.write_release(tmp_path / "src", bad, **DIMS, dict_lines=DICT_LINES)
    assert_refused(src, tmp_path / "out", "non-finite logits", verify=True, allow_nonfinite=True)


# ---- the command line ---------------------------------------------------------------------------------


def run_cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_cli_converts_and_exports(tmp_path, release):
    proc = run_cli("tools/convert_fairseq_ckpt.py", release / "model.pt", tmp_path / "out", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and params_io.ParamsReader(tmp_path / "out").dtype_name == "bfloat16"
    proc = run_cli("-m", "m11b_jax.convert", "--to-fairseq", tmp_path / "out", tmp_path / "fs",
                   "--model-parallel-size", "4")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "fs").glob("model-model_part-*.pt"))) == 4


def test_cli_refuses_malicious_and_failed_verify(tmp_path, fresh, release):
    marker = tmp_path / "PWNED"
    state = load_shard(fresh / "model-model_part-5.pt")
    state["args"] = _Shell(f"touch {shlex.quote(str(marker))}")
    torch.save(dict(state), fresh / "model-model_part-5.pt", _use_new_zipfile_serialization=False)
    proc = run_cli("-m", "m11b_jax.convert", fresh, tmp_path / "out")
    assert proc.returncode == 2 and not marker.exists()
    assert len(error_lines(proc)) == 1 and "refused" in error_lines(proc)[0], proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert leftovers(tmp_path / "out") == []

    shutil.copy(release / "model-model_part-5.pt", fresh)
    proc = run_cli("tools/convert_fairseq_ckpt.py", fresh, tmp_path / "out", "--verify")
    assert proc.returncode == 2, proc.stderr
    assert len(error_lines(proc)) == 1 and "verification failed" in error_lines(proc)[0], proc.stderr
    assert "logits finite: True" in proc.stderr
    assert leftovers(tmp_path / "out") == []

"""The seed's eval command, verbatim, on a release-layout checkpoint: `--path DIR/model.pt` reads the 8 fp16
fairseq shards straight onto the mesh and scores exactly as through a converted checkpoint."""

import json
import shutil

import numpy as np
import pytest

from fairseq_fixtures import fairseq_args, merged_state, write_release
from m11b_jax.convert import convert_fairseq
from m11b_jax.dictionary import Dictionary
from m11b_jax.eval_lm import main
from m11b_jax.indexed_dataset import dtype_for_vocab, write_dataset

# examples/megatron_11b/README.md's eval command (fairseq-eval-lm replaced), plus --cpu.
SEED_EVAL = ("--task language_modeling --criterion cross_entropy --distributed-world-size 8 --model-parallel-size 8 "
             "--batch-size 8 --gen-subset test --context-window 992 --path {path}/model.pt --cpu")
V, D, FFN, LAYERS, HEADS = 128, 32, 64, 2, 8


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    args = fairseq_args(D, FFN, LAYERS, HEADS, 8)
    args.tokens_per_sample = args.max_target_positions = 1024
    ckpt = write_release(root / "megatron_11b", merged_state(V, D, FFN, LAYERS, seed=5), d=D, ffn=FFN, layers=LAYERS,
                         heads=HEADS, mp=8, args=args)
    data = root / "data-bin"
    data.mkdir()
    shutil.copy(ckpt / "dict.txt", data / "dict.txt")
    rng = np.random.default_rng(0)
    lines = [np.append(rng.integers(4, V, int(rng.integers(3, 20))), 2) for _ in range(8)]
    write_dataset(data / "test", lines, dtype_for_vocab(len(Dictionary.load(data / "dict.txt"))))
    converted = root / "converted"
    convert_fairseq(ckpt, converted, log=lambda m: None)
    return {"ckpt": ckpt, "data": data, "converted": converted, "ntokens": sum(len(x) for x in lines)}


def _eval(capsys, argv, out):
    main(argv + ["--output-token-logprobs", str(out), "--json"])
    captured = capsys.readouterr()
    return json.loads(captured.out), np.load(out), captured.err


def test_seed_eval_command_on_release_shards_equals_the_converted_checkpoint(release, tmp_path, capsys):
    seed = [str(release["data"])] + SEED_EVAL.format(path=release["ckpt"]).split()
    summary, from_shards, err = _eval(capsys, seed, tmp_path / "shards.npy")
    assert "--task language_modeling, --criterion cross_entropy: accepted, changes nothing here" in err
    assert summary["ntokens"] == release["ntokens"] == from_shards.size
    conv, from_converted, _ = _eval(capsys, [str(release["data"]), "--path", str(release["converted"]),
                                             "--model-parallel-size", "8", "--context-window", "992"],
                                    tmp_path / "conv.npy")
    np.testing.assert_array_equal(from_shards, from_converted)
    assert summary["loss_base2"] == conv["loss_base2"]


def test_shards_onto_a_mesh_without_a_model_axis_equal_the_converted_params(release):
    """Each device of a (data 8, model 1) mesh gets every shard's block of every leaf: the same parameters as the
    converted checkpoint restored onto that mesh."""
    import jax

    from m11b_jax import sharding as S
    from m11b_jax.convert import load_fairseq_onto_mesh
    from m11b_jax.params_io import load_params

    mesh, rules = S.make_mesh(1), S.logical_rules()
    cfg, params, dict_path = load_fairseq_onto_mesh(release["ckpt"] / "model.pt", mesh, rules, log=lambda m: None)
    assert dict_path == release["ckpt"] / "dict.txt" and cfg.vocab_size == V and cfg.num_layers == LAYERS
    ref = load_params(release["converted"], mesh, rules, cfg=cfg)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref)):
        assert a.sharding == b.sharding, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


@pytest.mark.parametrize("extra, message", [
    (["--fp16"], r"--fp16 is not implemented: fairseq evaluates in fp16; use --dtype bfloat16"),
    (["--task", "translation"], r"--task translation is not implemented: --task language_modeling is"),
    (["--frobnicate"], r"unrecognized argument --frobnicate"),
])
def test_fairseq_flags_that_would_change_results_are_refused(release, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main([str(release["data"]), "--path", f"{release['ckpt']}/model.pt"] + extra)
    assert e.value.code != 0
    import re

    assert re.search(message, capsys.readouterr().err)


def test_missing_shard_is_one_clear_error(release, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(release["ckpt"], broken)
    (broken / "model-model_part-3.pt").unlink()
    with pytest.raises(SystemExit):
        main([str(release["data"]), "--path", f"{broken}/model.pt", "--model-parallel-size", "8"])
    assert "missing shard(s) model-model_part-3.pt" in capsys.readouterr().err

"""Issue 14: bad inputs, damaged files, write errors and signals give one line and leave nothing behind.

Each test here holds one row of benchmarks/RESULTS_reliability.md.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import pathlib
import pickle
import random
import signal
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import pytest
import torch

import fairseq_fixtures as ff
from m11b_jax import bpe as bpe_cli
from m11b_jax import detok as detok_cli
from m11b_jax import eval_lm
from m11b_jax import fsutil, params_io
from m11b_jax import preprocess as preprocess_cli
from m11b_jax.config import ModelConfig
from m11b_jax.convert import convert_fairseq
from m11b_jax.dictionary import Dictionary
from m11b_jax.errors import UserError
from m11b_jax.fairseq_io import load_shard
from m11b_jax.indexed_dataset import dtype_for_vocab, write_dataset
from m11b_jax.params_io import save_params
from m11b_jax.params_source import open_params_source
from m11b_jax.param_tree import init_params
from m11b_jax.sharding import logical_rules, make_mesh
from m11b_jax.tokenizer import GPT2BPE, _merge_short

REPO = pathlib.Path(__file__).resolve().parent.parent
DIMS = dict(d=32, ffn=64, layers=2, heads=8)
VOCAB, DICT_LINES = 128, 121
CFG = ModelConfig(name="harden-tiny", vocab_size=64, d_model=32, ffn_dim=64, num_layers=2, num_heads=8,
                  max_positions=64, remat_policy="none")


def quiet(msg):
    pass


def one_line_error(capsys, main, argv, code: int = 2) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def hidden_temporaries(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def run_module(module: str, *args, env=None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", f"m11b_jax.{module}", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def gpt2(shared_data):
    d = shared_data / "gpt2_bpe"
    return {"encoder": d / "encoder.json", "vocab": d / "vocab.bpe", "dict": d / "dict.txt"}


@pytest.fixture(scope="module")
def merged():
    return ff.merged_state(VOCAB, DIMS["d"], DIMS["ffn"], DIMS["layers"], seed=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory, merged):
    return ff.write_release(tmp_path_factory.mktemp("release") / "megatron", merged, **DIMS, dict_lines=DICT_LINES,
                            legacy=False)


# ---- write errors: one line, nothing left ----------------------------------------------------------


def test_outputs_that_cannot_be_written(tmp_path, gpt2, capsys):
    src = tmp_path / "in.txt"
    src.write_text("hello world\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "adir", tmp_path / "afile" / "out.txt"):
        err = one_line_error(capsys, detok_cli.main, [src, "--output", out])
        assert str(out) in err and ("is a directory" in err or "is a file, not a folder" in err)
        err = one_line_error(capsys, bpe_cli.main, ["--encoder-json", gpt2["encoder"], "--vocab-bpe", gpt2["vocab"],
                                                    "--inputs", src, "--outputs", out])
        assert str(out) in err
    err = one_line_error(capsys, preprocess_cli.main, ["--only-source", "--trainpref", src, "--srcdict", gpt2["dict"],
                                                       "--destdir", tmp_path / "afile" / "bin"])
    assert "--destdir" in err and "Not a directory" in err
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "train.bin").mkdir()
    err = one_line_error(capsys, preprocess_cli.main, ["--only-source", "--trainpref", src, "--srcdict", gpt2["dict"],
                                                       "--destdir", tmp_path / "bin"])
    assert "train.bin is a directory" in err
    assert hidden_temporaries(tmp_path) == []


def test_read_only_filesystem_and_disk_full_are_one_line(tmp_path, capsys, monkeypatch):
    """EROFS when the temporary is created, ENOSPC while writing: one line each, no temporary left."""
    src = tmp_path / "in.txt"
    src.write_text("a b\n" * 10)
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if ".tmp-" in os.fspath(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    err = one_line_error(capsys, detok_cli.main, [src, "--output", tmp_path / "out.txt"])
    assert "Read-only file system" in err and "out.txt" in err and "writable" in err
    monkeypatch.setattr(os, "open", real_open)

    monkeypatch.setattr(detok_cli, "detokenize_line", lambda line: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out.txt"))))
    err = one_line_error(capsys, detok_cli.main, [src, "--output", tmp_path / "out.txt"], code=1)
    assert "No space left on device" in err and "disk is full" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_convert_output_under_a_file(tmp_path, release, capsys):
    (tmp_path / "afile").write_text("x")
    from m11b_jax import convert

    err = one_line_error(capsys, convert.main, [release, tmp_path / "afile" / "out"])
    assert err == f"error: output {tmp_path / 'afile' / 'out'}: {tmp_path / 'afile'} is a file, not a folder: fix the path"


# ---- signals: temporaries removed, stale ones removed at the next start ------------------------------


def test_sigterm_during_bpe_and_detok_removes_the_temporary(tmp_path, gpt2):
    """The output's temporary exists while stdin is open; SIGTERM: exit 143, one line, no temporary."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for module, args in (("bpe", ["--encoder-json", gpt2["encoder"], "--vocab-bpe", gpt2["vocab"], "--inputs", "-",
                                  "--outputs", tmp_path / "out.bpe"]),
                         ("detok", ["-", "--output", tmp_path / "out.detok"])):
        proc = subprocess.Popen([sys.executable, "-m", f"m11b_jax.{module}", *map(str, args)], stdin=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        proc.stdin.write(b"hello world\n")
        proc.stdin.flush()
        deadline = time.time() + 120
        while not hidden_temporaries(tmp_path) and time.time() < deadline:
            time.sleep(0.1)
        assert hidden_temporaries(tmp_path), f"{module}: no temporary appeared"
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1].decode()
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert err.strip().splitlines() == ["error: interrupted by SIGTERM; removed 1 unfinished output(s)"], err
        assert hidden_temporaries(tmp_path) == [] and not list(tmp_path.glob("out.*"))


def test_sigterm_during_convert_and_preprocess(tmp_path, release, gpt2):
    out = tmp_path / "ckpt"
    r = run_module("convert", release, out, env={"M11B_TEST_SIGNAL": "convert-shard"})
    assert r.returncode == 143 and r.stderr.strip().splitlines()[-1].startswith("error: interrupted by SIGTERM"), r.stderr
    assert "Traceback" not in r.stderr and not out.exists() and hidden_temporaries(tmp_path) == []

    text = tmp_path / "train.txt"
    text.write_text("hello world\n" * 50)
    dest = tmp_path / "bin"
    args = ["--only-source", "--trainpref", text, "--validpref", text, "--srcdict", gpt2["dict"], "--destdir", dest]
    r = run_module("preprocess", *args, env={"M11B_TEST_SIGNAL": "preprocess-split"})
    assert r.returncode == 143 and "interrupted by SIGTERM" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(dest)) == []


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_stale_temporaries_of_a_killed_run_are_removed_at_the_next_start(tmp_path, release, gpt2):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    dest = tmp_path / "bin"
    args = ["--only-source", "--trainpref", text, "--srcdict", gpt2["dict"], "--destdir", dest]
    assert run_module("preprocess", *args, env={"M11B_TEST_SIGNAL": "preprocess-split:KILL"}).returncode == -9
    assert len(hidden_temporaries(dest)) >= 1
    r = run_module("preprocess", *args)
    assert r.returncode == 0 and "a temporary left by an interrupted run" in r.stderr
    assert sorted(os.listdir(dest)) == ["dict.txt", "train.bin", "train.idx"]

    out = tmp_path / "ckpt"  # what a SIGKILLed convert leaves: .ckpt.tmp-HOST-PID-XXXX with a dead PID
    stale = tmp_path / f".ckpt.tmp-{fsutil._HOST}-{dead_pid()}-0123abcd"
    (stale / "params").mkdir(parents=True)
    lines = []
    convert_fairseq(release, out, log=lines.append)
    assert not stale.exists() and (out / "checkpoint.json").is_file() and hidden_temporaries(tmp_path) == []


def test_live_process_temporaries_are_kept(tmp_path):
    mine = tmp_path / f".out.tmp-{fsutil._HOST}-{os.getpid()}-abcd"
    mine.mkdir()
    gone = tmp_path / f".out.tmp-{fsutil._HOST}-{dead_pid()}-abcd"
    gone.write_text("x")
    removed = fsutil.remove_stale_temporaries(tmp_path / "out", log=quiet)
    assert removed == [gone] and mine.exists()


def test_preprocess_is_all_or_nothing(tmp_path, gpt2, capsys):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("hello world\n")
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    dest = tmp_path / "bin"
    err = one_line_error(capsys, preprocess_cli.main, ["--only-source", "--trainpref", good, "--validpref", bad,
                                                       "--srcdict", gpt2["dict"], "--destdir", dest])
    assert "bad.txt line 2 is not UTF-8" in err
    assert os.listdir(dest) == []  # not even train.bin/.idx of the good split


# ---- BPE: the merge loop is O(n log n) ---------------------------------------------------------------


def test_long_pieces_merge_as_gpt2_does(gpt2):
    """The heap loop gives the published loop's tokens on long random words (alphabets of 2..28 letters) and
    tiktoken's on a 30 000-letter word."""
    bpe = GPT2BPE.from_files(gpt2["encoder"], gpt2["vocab"], engine="python")
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz\u00e9\u00df"
    for _ in range(60):
        word = "".join(rng.choice(letters[:rng.randint(2, len(letters))]) for _ in range(rng.choice([49, 80, 300])))
        reference = tuple(bpe.encoder[s] for s in _merge_short([bpe._byte_map[b] for b in word.encode()],
                                                                 bpe.merge_ranks))
        assert bpe._bpe_piece(word) == reference, word
    tiktoken_bpe = GPT2BPE.from_files(gpt2["encoder"], gpt2["vocab"], engine="tiktoken")
    word = "".join(rng.choice(letters[:26]) for _ in range(30_000))
    assert bpe.encode_python(word) == tiktoken_bpe.encode(word)
    assert bpe.encode_python("a" * 5000) == tiktoken_bpe.encode("a" * 5000)


# ---- the converter ------------------------------------------------------------------------------------


def test_nonfinite_weights_refused_unless_allowed(tmp_path, merged, capsys):
    bad = dict(merged)
    fc2 = merged["decoder.layers.1.fc2.weight"].copy()
    fc2[3, 5] = np.nan
    bad["decoder.layers.1.fc2.weight"] = fc2
    src = ff.write_release(tmp_path / "src", bad, **DIMS, dict_lines=DICT_LINES, legacy=False)
    with pytest.raises(UserError, match=r"decoder.layers.1.fc2.weight holds 1 non-finite value\(s\) \(nan at index "
                                        r"\[3, 5\]\).*--allow-nonfinite") as e:
        convert_fairseq(src, tmp_path / "out", log=quiet)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    warnings = []
    convert_fairseq(src, tmp_path / "out", allow_nonfinite=True, log=warnings.append)
    assert any(w.startswith("warning: ") and "fc2.weight holds 1 non-finite" in w for w in warnings)

    # eval_lm on it: one line naming the first NaN position, never an assert (and not ppl 1.0 under python -O)
    data = tmp_path / "data"
    data.mkdir()
    (data / "dict.txt").write_bytes((tmp_path / "out" / "dict.txt").read_bytes())
    write_dataset(data / "test", [np.arange(4, 40), np.array([2])], dtype_for_vocab(VOCAB))
    with pytest.raises(UserError, match=r"^the model scored 37 of 37 tokens as NaN \(the first at stream position 0\)"):
        eval_lm.run_eval(data, tmp_path / "out", tokens_per_sample=32, context_window=16, devices=jax.devices()[:1])


def test_missing_torch_names_the_extra(monkeypatch, release):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UserError, match=r"needs PyTorch, which is not installed: pip install -e '.\[convert\]'"):
        load_shard(release / "model-model_part-0.pt")


def test_tar_pickle_refused_without_weights_only_advice(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "model.tar"
    with tarfile.open(evil, "w") as t:
        for name, obj in (("sys_info", {}), ("pickle", {"model": Payload()}), ("storages", 0), ("tensors", 0)):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError) as e:
        load_shard(evil)
    message = str(e.value)
    assert message.startswith(f"refused {evil}") and "weights_only" not in message and "likely succeed" not in message
    assert not marker.exists()


# ---- eval_lm and wikitext103 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_ckpt(tmp_path_factory):
    """A training checkpoint (orbax, no dict.txt) of a 64-row model, and a data-bin with a 40-symbol dict."""
    from m11b_jax.checkpoint import Checkpointer
    from m11b_jax.train_step import OptimConfig, state_from_params, state_shardings

    root = tmp_path_factory.mktemp("evalckpt")
    mesh = make_mesh(1, jax.devices()[:1])
    params = init_params(CFG, mesh, logical_rules(), seed=3)
    state = state_from_params(params, OptimConfig(), state_shardings(CFG, mesh, logical_rules()))
    saver = Checkpointer(root / "run")
    saver.save(5, state, {"model_config": dataclasses.asdict(CFG)})
    saver.close()
    data = root / "data"
    data.mkdir()
    d = Dictionary()
    for i in range(36):
        d.add_symbol(f"w{i}", 100 - i)
    d.save(data / "dict.txt")
    rng = np.random.default_rng(0)
    write_dataset(data / "test", [np.append(rng.integers(4, 40, 20), 2) for _ in range(3)], dtype_for_vocab(40))
    return {"root": root, "data": data, "params": params}


def test_eval_relative_path_and_smaller_dictionary(train_ckpt, monkeypatch):
    """--path relative to the working directory (orbax needs it absolute); a 40-symbol dict inside 64 rows."""
    monkeypatch.chdir(train_ckpt["root"])
    for path in ("./run/../run",):  # a --save-dir; a step directory resolves the same way
        summary, result = eval_lm.run_eval("data", path, tokens_per_sample=32, context_window=16,
                                           devices=jax.devices()[:1])
        assert summary["ntokens"] == 63 and np.isfinite(result.token_logprobs).all()


def test_wikitext103_checks_dict_before_bpe(train_ckpt, tmp_path, gpt2, capsys, monkeypatch):
    from m11b_jax import wikitext103

    monkeypatch.setattr(wikitext103, "prepare_data_bin", lambda *a, **k: pytest.fail("BPE ran before the check"))
    data = tmp_path / "wt"
    data.mkdir()
    (data / "wiki.test.raw").write_text(" = A = \n")
    (data / "wiki.test.tokens").write_text(" = A = \n")
    err = one_line_error(capsys, wikitext103.main, ["--path", train_ckpt["root"] / "run", "--data-dir", data,
                                                     "--bpe-dir", gpt2["encoder"].parent, "--dict", gpt2["dict"]])
    assert "has 50264 symbols but the checkpoint's vocabulary is only 64" in err


# ---- training flags and data -------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--lr", "inf"), ("--clip-norm", "nan"),
                                        ("--adam-eps", "inf"), ("--dropout", "nan")])
def test_nonfinite_training_numbers_refused(flag, value):
    from m11b_jax.train import parse_args

    with pytest.raises(UserError, match=f"{flag} {value} is not a finite number"):
        parse_args(["--max-update", "1", flag, value])


@pytest.mark.parametrize("split", ["train", "valid"])
def test_token_ids_beyond_the_dictionary_refused_when_a_split_opens(tmp_path, split, capsys):
    from m11b_jax import train
    from train_fixtures import base_args, make_databin

    data = make_databin(tmp_path / "data", n_symbols=50, n_lines=40, valid_lines=8)
    lines = [np.array([5, 6, 7, 2]), np.array([8, 54, 9, 2])]  # 54 = the first id past the 54-symbol dict
    write_dataset(data / split, lines, dtype_for_vocab(54))
    err = one_line_error(capsys, train.main, base_args(data, tmp_path / "save"))
    assert f"{split}.bin holds token id 54 at position 5, but dict.txt has 54 symbols" in err



# ---- checkpoints: verified, locked, sized --------------------------------------------------------------


def flip_a_byte(step: pathlib.Path) -> pathlib.Path:
    biggest = max((p for p in (step / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    return biggest


@pytest.fixture(scope="module")
def disk_full_run(tmp_path_factory):
    """Training to update 6, saving every 2; the disk is 'full' (free_bytes says 1 KiB) at the third save."""
    from m11b_jax import checkpoint as ckpt
    from m11b_jax.train import run
    from train_fixtures import base_args, shared_databin

    save = tmp_path_factory.mktemp("diskfull") / "run"
    calls = []
    real = fsutil.free_bytes

    def free(path):
        calls.append(path)
        return 1024 if len(calls) >= 3 else real(path)

    mp = pytest.MonkeyPatch()
    mp.setattr(fsutil, "free_bytes", free)
    try:
        with pytest.raises(UserError) as e:
            run(base_args(shared_databin(), save, "--save-interval-updates", "2", "--disable-validation",
                          max_update=6))
    finally:
        mp.undo()
    return save, str(e.value), ckpt.list_steps(save)


def test_disk_full_at_a_save_is_one_line_and_keeps_the_previous_checkpoint(disk_full_run):
    save, message, steps = disk_full_run
    assert message.startswith(f"not enough disk space for the checkpoint of update 6 in {save}: it needs about ")
    assert message.endswith(f"(the previous checkpoint {save / '4'} is kept)") and "\n" not in message
    assert steps == [2, 4] and not [p for p in save.iterdir() if "tmp" in p.name]
    assert all((save / str(u) / "m11b_manifest.json").is_file() for u in steps)


def test_write_error_in_the_background_is_one_line(tmp_path):
    from m11b_jax.checkpoint import Checkpointer

    saver = Checkpointer(tmp_path / "run")
    saver._need = 3 << 30  # update 8's save needs 3 GiB

    def fail():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "8.orbax-checkpoint-tmp"))
        except OSError as e:
            raise RuntimeError("orbax: 1 of 12 writes failed") from e

    saver._mgr.wait_until_finished = fail
    saver._commit_in_background(8)  # orbax's write of update 8 fails in the background: reported at the join
    with pytest.raises(UserError, match=r"^writing the checkpoint of update 8 in .* failed: .*No space left on device "
                                        r"\(the disk is full.*; it needs about 3.00 GiB free \(no earlier checkpoint was "
                                        r"saved\)$"):
        saver.wait()


def test_damaged_checkpoints_fall_back_to_the_newest_intact_one(disk_full_run, tmp_path):
    import shutil

    from m11b_jax import checkpoint as ckpt

    src = disk_full_run[0]
    save = tmp_path / "run"
    shutil.copytree(src, save)
    assert ckpt.find_restore_point(save, "checkpoint_last") == (save, 4)
    flip_a_byte(save / "4")
    notes = []
    assert ckpt.find_restore_point(save, "checkpoint_last", log=notes.append) == (save, 2)
    assert "does not match its checksum" in notes[0] and f"checkpoint {save / '4'} is damaged" in notes[0]
    assert notes[1] == f"| resuming from {save / '2'}, the newest intact checkpoint"
    assert not (save / "4").exists() and len(list(save.glob("damaged-4-*"))) == 1  # set aside, not deleted

    with pytest.raises(UserError, match=r"--restore-file .*damaged-4-\d+: no checkpoint there"):
        ckpt.find_restore_point(save, str(next(save.glob("damaged-4-*"))))
    victim = next(p for p in (save / "2" / "state").rglob("*") if p.is_file() and p.stat().st_size > 100)
    victim.write_bytes(victim.read_bytes()[:50])  # truncated
    with pytest.raises(UserError, match=r"--restore-file 2: checkpoint .*/2 is damaged \(state/.* has 50 bytes"):
        ckpt.find_restore_point(save, "2")
    with pytest.raises(UserError, match=r"^no intact checkpoint in .*: the newest, update 2, is damaged .*pass "
                                        r"--restore-file with a checkpoint you trust"):
        ckpt.find_restore_point(save, "checkpoint_last")

    other = tmp_path / "other"
    shutil.copytree(src, other)
    shutil.rmtree(other / "4" / "state")
    notes = []
    assert ckpt.find_restore_point(other, "checkpoint_last", log=notes.append) == (other, 2)
    assert "its state directory is missing" in notes[0]
    (other / "2" / "m11b_manifest.json").unlink()
    with pytest.raises(UserError, match="no m11b_manifest.json: the save never finished"):
        ckpt.find_restore_point(other, "2")
    # Every other reader of training checkpoints refuses it too: eval_lm / generate / the API, convert / HF export.
    for load in (lambda: params_io.load_checkpoint(other / "2", None, None, "float32"),
                 lambda: open_params_source(other / "2")):
        with pytest.raises(UserError, match=r"checkpoint .*/2 is damaged \(it has no m11b_manifest.json"):
            load()


def test_training_resumes_from_the_newest_intact_checkpoint(disk_full_run, tmp_path, capsys):
    """The trainer's resume goes through the verification: a flipped byte in update 4 -> it resumes from 2, says so,
    and saves a fresh, verified update 4 (the damaged one kept aside)."""
    import shutil

    from m11b_jax import checkpoint as ckpt
    from m11b_jax.train import run
    from train_fixtures import base_args, shared_databin

    save = tmp_path / "run"
    shutil.copytree(disk_full_run[0], save)
    flip_a_byte(save / "4")
    summary = run(base_args(shared_databin(), save, "--save-interval-updates", "2", "--disable-validation",
                            max_update=4))
    err = capsys.readouterr().err
    assert f"| checkpoint {save / '4'} is damaged (state/" in err and "does not match its checksum" in err
    assert f"| resuming from {save / '2'}, the newest intact checkpoint" in err
    assert summary.start_update == 2 and summary.resumed_from == str(save / "2")
    assert ckpt.list_steps(save) == [2, 4] and ckpt.verify_step(save, 4) is None
    assert len(list(save.glob("damaged-4-*"))) == 1


def test_second_trainer_on_a_save_dir_refuses_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    from m11b_jax import train
    from train_fixtures import base_args, shared_databin

    save = tmp_path / "run"
    save.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from m11b_jax.fsutil import DirectoryLock; "
                               f"DirectoryLock({str(save)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = one_line_error(capsys, train.main, base_args(shared_databin(), save))
        assert err == (f"error: --save-dir {save} is in use by another run (pid {holder.pid} on "
                       f"{__import__('socket').gethostname()}, lock {save / '.lock'}): wait for it to finish or "
                       "choose another --save-dir")
    finally:
        holder.kill()
        holder.wait()
    notes = []
    with fsutil.DirectoryLock(save, log=notes.append):
        assert notes == [f"| --save-dir {save}: took over a stale lock of a run that is gone "
                         f"(pid {holder.pid} on {__import__('socket').gethostname()})"]
    assert (save / ".lock").read_text() == ""  # released: empty, nothing to report next time
    with fsutil.DirectoryLock(save, log=notes.append):
        assert len(notes) == 1


def test_memory_guard_refuses_the_11b_state_on_a_24_gib_host(tmp_path, capsys, monkeypatch):
    """Before anything is allocated: 11B x (fp32 params + 2 Adam moments) over (4 data x 2 model) devices."""
    import collections

    import psutil

    from m11b_jax import train
    from train_fixtures import base_args, shared_databin

    memory = collections.namedtuple("memory", "available")(24 * 2**30)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    argv = base_args(shared_databin(), tmp_path / "run", "--share-decoder-input-output-embed")
    argv[argv.index("--arch") + 1] = "transformer_lm_megatron_11b"
    err = one_line_error(capsys, train.main, argv)
    assert err.startswith("error: transformer_lm_megatron_11b's train state (parameters + Adam moments) needs ")
    need = float(err.split("needs ")[1].split(" GiB")[0])
    assert 8 * 11.0e9 * 12 / 2 / 2**30 < need < 8 * 11.5e9 * 12 / 2 / 2**30  # 8 devices, each half the model
    assert "24.0 GiB are available" in err and "--compile-only" in err and "--model-parallel-size" in err


def test_finetune_takes_the_checkpoints_config_and_validate_at_start(tmp_path):
    from m11b_jax.config import load_config
    from m11b_jax.train import parse_args

    cfg = load_config("tiny").replace(num_layers=3)
    ckpt = save_params(init_params(cfg, make_mesh(2), logical_rules(), seed=1), tmp_path / "conv", cfg)
    run = parse_args([str(tmp_path), "--finetune-from-model", str(ckpt), "--batch-size", "2", "--dropout", "0.0",
                      "--validate-at-start"])
    assert run.model == cfg.replace(dropout=0.0) and run.validate_at_start
    with pytest.raises(UserError, match=r"--finetune-from-model .* holds no config.json .*give --arch"):
        parse_args([str(tmp_path), "--finetune-from-model", str(tmp_path), "--batch-size", "2"])

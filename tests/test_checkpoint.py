"""Checkpoints: exact resume after SIGKILL (also mid-save), SIGTERM, a different mesh, NaN stops."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from m11b_jax import checkpoint as ckpt
from m11b_jax.errors import UserError
from m11b_jax.train import run
from train_fixtures import REPO, base_args, run_cli, shared_databin, straight_losses, subprocess_env, train_losses


@pytest.fixture(scope="module")
def data():
    return shared_databin()


def test_resume_after_sigkill_mid_save_matches_straight_run(data, tmp_path):
    """Killed while update 4's checkpoint is being written: update 2's stays the latest, and the resumed run's
    per-update losses equal those of a run that never stopped (fp32, CPU, dropout on)."""
    save = tmp_path / "run"
    args = base_args(data, save, "--save-interval-updates", "2")
    killed = run_cli(args, M11B_TEST_KILL_DURING_SAVE="4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = [p.name for p in save.iterdir() if "tmp" in p.name]
    assert leftovers and all(p.startswith("4.") for p in leftovers), sorted(os.listdir(save))  # died mid-save
    assert ckpt.list_steps(save) == [2]
    assert ckpt.find_restore_point(save, "checkpoint_last") == (save.absolute(), 2)

    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {save.absolute()}/2" in resumed.stderr
    assert ckpt.list_steps(save) == [2, 4, 6]
    assert not [p for p in save.iterdir() if "tmp" in p.name]  # the dead save's folder was cleaned up

    straight = straight_losses(data)
    got = train_losses(save)  # updates 1-4 from the killed run, 3-6 rewritten by the resumed one
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for u in range(1, 7):
        assert abs(got[u] - straight[u]) <= 1e-6, (u, got[u], straight[u])
    assert straight[6] < straight[1] - 1.0  # it did learn


def test_sigterm_saves_then_exits_0(data, tmp_path):
    save = tmp_path / "run"
    args = base_args(data, save, max_update=100000)
    proc = subprocess.Popen([sys.executable, "-m", "m11b_jax.train", *args], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = save / "train_log.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM received" in err
    steps = ckpt.list_steps(save)
    assert len(steps) == 1 and steps[0] >= 3
    assert max(train_losses(save)) == steps[0]  # saved at the update it stopped after
    meta = ckpt.read_meta(save, steps[0])
    d = meta["data"]
    assert meta["update"] == steps[0]
    assert d["epoch"] * (d["num_blocks"] // d["global_batch_size"]) + d["position"] == steps[0]  # batches consumed
    assert "stopped by SIGTERM" in out
    # Committed before the exit: written and hashed; no temporary left; the --save-dir lock released.
    assert ckpt.verify_step(save, steps[0]) is None
    assert not [p for p in save.iterdir() if "tmp" in p.name] and (save / ".lock").read_text() == ""


def test_restore_onto_another_mesh_and_keep_training(data, tmp_path):
    """(data 1, model 8) -> (data 2, model 4), same global batch: training continues as on the first mesh."""
    save = tmp_path / "run"
    first = run(base_args(data, save, "--disable-validation", mp=8, batch=4, max_update=2))
    assert first.mesh == {"data": 1, "model": 8} and ckpt.list_steps(save) == [2]

    with pytest.raises(UserError, match=r"global batch of 4 blocks, this run has 8 .*--batch-size 2"):
        run(base_args(data, save, mp=4, batch=4, max_update=4))
    with pytest.raises(UserError, match=r"not divisible by the data axis \(8"):
        run(base_args(data, save, mp=1, batch=1, max_update=4))

    second = run(base_args(data, save, "--disable-validation", mp=4, batch=2, max_update=4))
    assert second.mesh == {"data": 2, "model": 4} and second.start_update == 2
    straight = straight_losses(data, mp=8, batch=4, max_update=4)
    for u in (3, 4):
        np.testing.assert_allclose(second.losses[u], straight[u], rtol=1e-5, err_msg=f"update {u}")
    assert ckpt.list_steps(save) == [2, 4]


def test_nan_loss_stops_with_error_and_keeps_last_good_checkpoint(data, tmp_path):
    save = tmp_path / "run"
    # No warmup and an absurd lr: update 1 (finite loss) throws the weights to ~1e30, update 2's loss is not finite.
    args = base_args(data, save, "--save-interval-updates", "1", "--disable-validation", max_update=5)
    args[args.index("--lr") + 1] = "1e30"
    args[args.index("--warmup-updates") + 1] = "0"
    with pytest.raises(UserError, match=r"loss is (nan|inf|-inf) .*at update 2: training stopped; the last verified "
                                        r"checkpoint is .*/1;"):
        run(args)
    assert ckpt.list_steps(save) == [1]
    assert not [p for p in save.iterdir() if "tmp" in p.name]
    records = [json.loads(x) for x in (save / "train_log.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if "loss" in r] == [1]


def test_unwritable_save_dir_is_one_clear_error(data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"cannot write to --save-dir .*a_file/ckpt .*choose a writable directory"):
        run(base_args(data, blocker / "ckpt"))


def test_finetune_from_converted_params_then_resume(data, tmp_path, capsys):
    """--finetune-from-model: converted parameters + fresh Adam state. Converting the seed-5 initialization and
    fine-tuning from it must reproduce a from-scratch --seed 5 run exactly; once the save dir holds a
    checkpoint, the run resumes from it instead."""
    from m11b_jax import param_tree, sharding
    from m11b_jax.config import load_config
    from m11b_jax.params_io import save_params

    cfg = load_config("tiny")
    mesh = sharding.make_mesh(2)
    converted = save_params(param_tree.init_params(cfg, mesh, sharding.logical_rules(), seed=5), tmp_path / "converted", cfg)
    common = ("--seed", "5", "--disable-validation")
    scratch = run(base_args(data, tmp_path / "a", *common, "--no-save", max_update=3))
    tuned = run(base_args(data, tmp_path / "b", *common, "--finetune-from-model", str(converted), max_update=3))
    assert tuned.start_update == 0 and tuned.resumed_from is None
    assert f"| --finetune-from-model: loaded {converted} (tiny, " in capsys.readouterr().err
    for u in (1, 2, 3):
        assert abs(tuned.losses[u] - scratch.losses[u]) <= 1e-6, u
    again = run(base_args(data, tmp_path / "b", *common, "--finetune-from-model", str(converted), max_update=4))
    assert again.start_update == 3 and again.resumed_from.endswith("/3")

    other = tmp_path / "other.json"
    other.write_text((pathlib.Path(__file__).parent.parent / "configs" / "tiny.json").read_text()
                     .replace('"num_layers": 2', '"num_layers": 3'))
    argv = base_args(data, tmp_path / "c", *common, "--finetune-from-model", str(converted))
    argv[argv.index("--arch") + 1] = str(other)
    with pytest.raises(UserError, match=r"is of another model \(num_layers 2 vs 3\)"):
        run(argv)


def test_hashing_runs_in_the_background_while_training_goes_on(tmp_path, monkeypatch):
    """A save returns at once and its checkpoint is hashed in a background thread while the next train step runs
    (today's pre-change behaviour hashed it only at the next save, stalling the step loop); the next save joins it.
    Retention (keep 1) never deletes the newest verified checkpoint while a newer one is still unhashed; an error
    in the thread surfaces at the join as one line."""
    import errno
    import threading

    import jax
    import jax.numpy as jnp

    started, release = threading.Event(), threading.Event()
    fail = []
    real = ckpt.write_manifest

    def slow_write_manifest(step):
        started.set()
        if not release.wait(60):
            raise OSError(errno.ETIMEDOUT, "test: the step loop never released the hashing")
        if fail:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(step / "state"))
        real(step)

    monkeypatch.setattr(ckpt, "write_manifest", slow_write_manifest)
    run_dir = tmp_path / "run"
    saver = ckpt.Checkpointer(run_dir, keep=1)
    state = {"w": jnp.arange(4096, dtype=jnp.float32), "b": jnp.ones((64,), jnp.float32)}
    train_step = jax.jit(lambda s: jax.tree.map(lambda x: x * 0.5 + 1.0, s))

    saver.save(1, state, {"note": "one"})
    state = jax.block_until_ready(train_step(state))  # the next train step runs while update 1 is written/hashed
    assert started.wait(30), "update 1 was not hashed while training went on"
    assert saver.last_verified is None and not (run_dir / "1" / ckpt.MANIFEST).exists()  # not committed yet
    release.set()

    started.clear()
    release.clear()
    saver.save(2, state, {"note": "two"})  # joins update 1's hashing first: now it is committed
    assert saver.last_verified == 1 and ckpt.verify_step(run_dir, 1) is None
    state = jax.block_until_ready(train_step(state))
    assert started.wait(30)
    assert (run_dir / "1").is_dir() and ckpt.verify_step(run_dir, 1) is None  # kept while update 2 is unhashed
    release.set()
    saver.wait()
    assert saver.last_verified == 2 and ckpt.step_dirs(run_dir) == [2] and ckpt.verify_step(run_dir, 2) is None

    fail.append(True)
    saver.save(3, state, {"note": "three"})
    with pytest.raises(UserError) as e:
        saver.wait()
    message = str(e.value)
    assert message.startswith(f"writing the checkpoint of update 3 in {run_dir} failed: ") and "\n" not in message
    assert message.endswith(f"(the previous checkpoint {run_dir / '2'} is kept)")
    assert saver.last_verified == 2 and ckpt.verify_step(run_dir, 2) is None
    assert ckpt.verify_step(run_dir, 3) is not None  # never committed: a restore falls back to update 2
    saver.close()

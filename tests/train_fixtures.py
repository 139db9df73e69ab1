"""Shared helpers for the training tests: a small synthetic data-bin and ways to run the training CLI."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

from m11b_jax.dictionary import Dictionary
from m11b_jax.indexed_dataset import dtype_for_vocab, write_dataset

REPO = pathlib.Path(__file__).resolve().parent.parent

# One XLA compilation cache for this test session, shared by the in-process runs and the CLI subprocesses:
# they compile the same few programs, and a CPU compile costs ~10 s on a loaded 2-core machine.
COMPILE_CACHE = tempfile.mkdtemp(prefix="m11b-test-xla-cache-")
atexit.register(shutil.rmtree, COMPILE_CACHE, ignore_errors=True)
try:
    import jax

    jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
except Exception:  # noqa: BLE001 - only a speed-up
    pass


def make_databin(path: pathlib.Path, *, n_symbols: int = 200, n_lines: int = 600, valid_lines: int = 60,
                 seed: int = 0) -> pathlib.Path:
    """dict.txt + train/valid splits of a learnable toy language (a sparse first-order Markov chain)."""
    path.mkdir(parents=True, exist_ok=True)
    d = Dictionary()
    for i in range(n_symbols):
        d.add_symbol(f"w{i}", n_symbols - i)
    d.save(path / "dict.txt")
    rng = np.random.default_rng(seed)
    first = d.nspecial
    nexts = rng.integers(first, first + n_symbols, size=(n_symbols, 3))  # each word has 3 likely successors

    def lines(n):
        out = []
        for _ in range(n):
            w = int(rng.integers(first, first + n_symbols))
            seq = [w]
            for _ in range(int(rng.integers(4, 30))):
                w = int(nexts[w - first, rng.integers(3)]) if rng.random() < 0.9 else int(rng.integers(first, first + n_symbols))
                seq.append(w)
            out.append(np.array(seq + [d.eos()]))
        return out

    write_dataset(path / "train", lines(n_lines), dtype_for_vocab(len(d)))
    write_dataset(path / "valid", lines(valid_lines), dtype_for_vocab(len(d)))
    return path


_SHARED: dict[str, pathlib.Path] = {}


def shared_databin() -> pathlib.Path:
    """One synthetic data-bin for the whole session (so cached straight runs are shared between test files)."""
    if "path" not in _SHARED:
        root = pathlib.Path(tempfile.mkdtemp(prefix="m11b-test-databin-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _SHARED["path"] = make_databin(root / "data")
    return _SHARED["path"]


def base_args(data: pathlib.Path, save_dir: pathlib.Path, *extra: str, mp: int = 2, batch: int = 2,
              max_update: int = 6) -> list[str]:
    return [str(data), "--arch", "tiny", "--tokens-per-sample", "32", "--batch-size", str(batch),
            "--model-parallel-size", str(mp), "--lr", "0.002", "--warmup-updates", "2", "--weight-decay", "0.01",
            "--max-update", str(max_update), "--log-interval", "1", "--no-progress-bar", "--save-dir", str(save_dir),
            "--distributed-world-size", "8", *extra]  # 8 simulated devices in a CLI subprocess too (default 1)


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)
    env.pop("XLA_FLAGS", None)  # the CLI sets up its own simulated devices
    return env


def run_cli(args: list[str], *, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m11b_jax.train", *args], cwd=REPO, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def train_losses(save_dir: pathlib.Path) -> dict[int, float]:
    """update -> loss from SAVE_DIR/train_log.jsonl (log interval 1); a later line for an update wins."""
    out = {}
    for line in (pathlib.Path(save_dir) / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["update"]] = rec["loss"]
    return out


_STRAIGHT: dict[tuple, dict[int, float]] = {}


def straight_losses(data: pathlib.Path, **kw) -> dict[int, float]:
    """Per-update losses of an uninterrupted in-process run (cached: several tests compare against it)."""
    from m11b_jax.train import run

    key = (str(data), tuple(sorted(kw.items())))
    if key not in _STRAIGHT:
        save = pathlib.Path(tempfile.mkdtemp(prefix="straight-"))
        summary = run(base_args(data, save, "--no-save", **kw))
        _STRAIGHT[key] = {int(u): v for u, v in summary.losses.items()}
    return _STRAIGHT[key]


def tensorboard_tags(logdir: pathlib.Path) -> set[str]:
    """Scalar tags of tensorboardX event files (TFRecord framing: length, crc, event, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for path in logdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            tags |= {v.tag for v in event.summary.value}
            pos += 12 + length + 4
    return tags

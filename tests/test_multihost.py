"""Two processes x 4 simulated CPU devices (gloo collectives over 127.0.0.1) train exactly like one process
with 8 devices: same mesh (4, 2), same global batches, same per-update losses."""

import json
import socket
import subprocess
import sys

import numpy as np

from m11b_jax import checkpoint as ckpt
from train_fixtures import REPO, base_args, shared_databin, straight_losses, subprocess_env, train_losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    data = shared_databin()
    save = tmp_path / "run"
    port = _free_port()
    procs = []
    for pid in range(2):
        args = base_args(data, save, "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                         "--process-id", str(pid), "--distributed-world-size", "8")
        procs.append(subprocess.Popen([sys.executable, "-m", "m11b_jax.train", *args], cwd=REPO,
                                      env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    for pid, (_, err) in enumerate(outs):
        assert f"process {pid}/2: 4 local devices, reads data shard {pid} of 2 (4 of the 8 rows" in err
    assert "mesh {'data': 4, 'model': 2} on 8 cpu device(s), 2 process(es)" in outs[0][1]

    got = train_losses(save)  # written by process 0
    want = straight_losses(data)  # one process, 8 devices
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([got[u] for u in range(1, 7)], [want[u] for u in range(1, 7)], rtol=1e-5)
    assert ckpt.list_steps(save) == [6]  # both processes wrote their shards of one checkpoint
    # Both processes hashed a disjoint share of its files; process 0 merged them into one manifest that verifies.
    manifest = json.loads((save / "6" / ckpt.MANIFEST).read_text())
    assert ckpt.verify_step(save, 6) is None
    assert sorted(manifest["hashed_by"]) == ["0", "1"] and min(manifest["hashed_by"].values()) > 0
    assert sum(manifest["hashed_by"].values()) == len(manifest["files"])

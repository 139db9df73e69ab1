"""Accelerator check of a converted checkpoint: restore it onto the available devices and run --verify's forward.

    python benchmarks/gpu_check_convert.py [--layers 4] [--workdir DIR]

Converts a synthetic release-sized checkpoint (see bench_convert.py; random weights, so --verify's "sane"
verdict is expected to be False), times `params_io.load_params` onto the default devices (MB/s of the
stored checkpoint), runs `verify_checkpoint(strict=False)` there and, in a subprocess, on the CPU, and
prints both reports and their difference. Removes what it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

CPU_VERIFY = ("import json, sys; from m11b_jax.convert import verify_checkpoint; "
              "r = verify_checkpoint(sys.argv[1], strict=False, log=lambda m: None); print(json.dumps(r))")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()

    import jax

    import bench_convert
    from m11b_jax import params_io
    from m11b_jax.convert import convert_fairseq, verify_checkpoint
    from m11b_jax.sharding import logical_rules, make_mesh

    work = pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_convert-", dir=a.workdir))
    try:
        bench_convert.write_synthetic(work / "src", a.layers, legacy=True)
        ckpt = work / "ckpt"
        convert_fairseq(work / "src", ckpt, log=lambda m: None)
        shutil.rmtree(work / "src")
        stored = sum(f.stat().st_size for f in (ckpt / "params").rglob("*") if f.is_file())
        devices = jax.devices()
        print(f"devices: {devices}")
        mesh = make_mesh(len(devices), devices) if len(devices) > 1 else make_mesh(1, devices)
        t0 = time.perf_counter()
        params = params_io.load_params(ckpt, mesh, logical_rules())
        jax.block_until_ready(params)
        seconds = time.perf_counter() - t0
        print(f"load_params: {stored / 1e9:.2f} GB onto {len(devices)} {devices[0].platform} device(s) in "
              f"{seconds:.1f} s ({stored / 1e6 / seconds:.0f} MB/s)")
        del params
        t0 = time.perf_counter()
        report = verify_checkpoint(ckpt, strict=False, log=print)
        print(f"verify on {devices[0].platform} (load + compile + forward): {time.perf_counter() - t0:.1f} s")
        cpu = subprocess.run([sys.executable, "-c", CPU_VERIFY, str(ckpt)], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if cpu.returncode != 0:
            raise SystemExit(cpu.stderr[-3000:])
        ref = json.loads(cpu.stdout.strip().splitlines()[-1])
        print("accelerator:", json.dumps(report))
        print("cpu:        ", json.dumps(ref))
        for key in ("loss_first", "loss_repeat"):
            print(f"{key}: |accelerator - cpu| = {abs(report[key] - ref[key]):.2e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The training CLI end to end on one GPU: ~1.3B throughput/MFU, and exact checkpoint resume.

    PYTHONPATH=. python benchmarks/gpu_train_cli.py DATA_BIN [--out DIR]

1. `python -m m11b_jax.train DATA_BIN --arch megatron_1p3b --bf16 --batch-size 8 --tokens-per-sample 1024`
   for 40 updates (no checkpoints, no validation): the logged wps and MFU of the last intervals (MFU over the
   chip's dense bf16 peak, 6N + attention FLOPs, remat recompute not counted).
2. `tiny` for 12 updates straight, and again as 8 updates + a resume to 12 from the update-8 checkpoint:
   the per-update losses after the resume must equal the straight run's (same program on the same GPU).
Prints one JSON line per result; logs go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def cli(args: list[str], log: pathlib.Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "m11b_jax.train", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
    return rc, time.perf_counter() - t0


def records(save_dir: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (save_dir / "train_log.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--out", default="gpu_out")
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--big-arch", default="megatron_1p3b")
    ap.add_argument("--big-tokens", default="1024")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path("/tmp/gpu_train_cli")
    subprocess.run(["rm", "-rf", str(work)])

    save = work / "big"
    args = [a.data, "--arch", a.big_arch, "--bf16", "--batch-size", "8", "--tokens-per-sample", a.big_tokens,
            "--max-update", str(a.updates), "--log-interval", "10", "--lr", "0.0003", "--warmup-updates", "10",
            "--disable-validation", "--no-save", "--no-progress-bar", "--save-dir", str(save)]
    rc, wall = cli(args, out / "big.log")
    row = {"run": "1.3b", "rc": rc, "wall_s": round(wall, 1), "command": "python -m m11b_jax.train " + " ".join(args)}
    if rc == 0:
        train = [r for r in records(save) if "loss" in r]
        row.update({"intervals": [{k: r.get(k) for k in ("update", "loss", "wps", "model_tflops", "mfu")} for r in train]})
    print(json.dumps(row), flush=True)

    tiny = ["--arch", "tiny", "--tokens-per-sample", "128", "--batch-size", "8", "--lr", "0.002",
            "--warmup-updates", "2", "--log-interval", "1", "--disable-validation", "--no-progress-bar"]
    rc1, _ = cli([a.data, *tiny, "--max-update", "12", "--no-save", "--save-dir", str(work / "straight")],
                 out / "tiny_straight.log")
    rc2, _ = cli([a.data, *tiny, "--max-update", "8", "--save-dir", str(work / "resume")], out / "tiny_first.log")
    rc3, _ = cli([a.data, *tiny, "--max-update", "12", "--save-dir", str(work / "resume")], out / "tiny_resume.log")
    row = {"run": "tiny_resume", "rc": [rc1, rc2, rc3]}
    if rc1 == rc2 == rc3 == 0:
        straight = {r["update"]: r["loss"] for r in records(work / "straight") if "loss" in r}
        resumed = {r["update"]: r["loss"] for r in records(work / "resume") if "loss" in r}
        row["max_abs_diff_after_resume"] = max(abs(resumed[u] - straight[u]) for u in range(9, 13))
        row["resumed_from_8"] = "resumed from" in (out / "tiny_resume.log").read_text()
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

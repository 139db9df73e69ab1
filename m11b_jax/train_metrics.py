"""Training metrics: the divergence check, interval statistics, model-FLOPs utilization against known device
peaks, where each log line goes, and the run's summary.

MFU = (analytic model FLOPs per update x updates) / (elapsed seconds x devices x peak FLOP/s per device).
The FLOPs are `config.analytic_train_flops` (6 N per token + attention, no remat recompute). Peaks are the
vendors' dense (no sparsity) matmul figures for the compute dtype (`peak_flops`). Unknown devices (and CPUs)
give MFU `None`.

`MetricsLogger` writes every log line three ways: the console (through tqdm, so the progress bar stays at
the bottom), one JSON object per line in `SAVE_DIR/train_log.jsonl`, and TensorBoard scalars (tensorboardX,
no TensorFlow) when a log dir is given. Only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Callable

from m11b_jax.errors import UserError


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN/inf (or, with loss scaling, the scale reached its minimum)."""


def check_finite(update: int, loss: float, gnorm: float, last_checkpoint: Callable[[], str]) -> None:
    """Stop training with a one-line error when an update's loss or gradient norm is NaN/inf; `last_checkpoint()`
    says where the run can restart (only called then: it waits for a save in flight)."""
    if math.isfinite(loss) and math.isfinite(gnorm):
        return
    raise TrainingDiverged(f"loss is {loss} (gradient norm {gnorm}) at update {update}: training stopped; "
                           f"{last_checkpoint()}; lower --lr, set --clip-norm, or check the data")


def peak_flops(device_kind: str, compute_dtype: str) -> float | None:
    """Dense peak FLOP/s of one device for `compute_dtype`, or None when unknown (e.g. any CPU).

    The bf16 figures are `targets.PEAK_BF16_FLOPS`. fp32 matmuls run as TF32 on NVIDIA GPUs by default in
    XLA, whose dense peak is half the bf16 one (A100, H100, H200); TPUs run fp32 matmuls as bf16 passes.
    """
    from m11b_jax.targets import peak_flops as bf16_peak

    peak = bf16_peak(device_kind)
    if peak is not None and compute_dtype == "float32" and "tpu" not in device_kind.lower():
        peak /= 2
    return peak


def mfu(flops_per_update: float, updates: int, seconds: float, num_devices: int, peak: float | None) -> float | None:
    if peak is None or seconds <= 0 or updates <= 0:
        return None
    return flops_per_update * updates / (seconds * num_devices * peak)


def base2_ppl(loss_base2: float) -> float:
    """fairseq's perplexity from a base-2 loss (inf when it overflows)."""
    try:
        return 2.0 ** loss_base2
    except OverflowError:
        return math.inf


@dataclasses.dataclass
class IntervalStats:
    """Training statistics since the last log line."""

    t0: float = 0.0  # when timing started (the first update includes compilation and is not timed)
    nll: float = 0.0
    ntokens: float = 0.0
    gnorm: float = 0.0
    updates: int = 0
    timed_updates: int = 0
    timed_tokens: float = 0.0
    paused: float = 0.0  # seconds spent validating / saving, not training

    def add(self, nll_sum: float, ntokens: float, gnorm: float, timed: bool) -> None:
        self.nll += nll_sum
        self.ntokens += ntokens
        self.gnorm += gnorm
        self.updates += 1
        if timed:
            self.timed_updates += 1
            self.timed_tokens += ntokens

    def record(self, update: int, lr: float, now: float, *, flops_per_update: float, num_devices: int,
               peak: float | None, t_start: float) -> dict:
        """The train log line of this interval (fairseq's loss, ppl, lr, gnorm, wpb, wps, ups; MFU)."""
        secs = now - self.t0 - self.paused
        timed = self.timed_updates > 0 and secs > 0
        loss = self.nll / max(self.ntokens, 1.0) / math.log(2)
        return {"update": update, "loss": loss, "ppl": base2_ppl(loss), "lr": lr, "gnorm": self.gnorm / self.updates,
                "wpb": self.ntokens / self.updates,
                "wps": self.timed_tokens / secs if timed else None,
                "ups": self.timed_updates / secs if timed else None,
                "model_tflops": flops_per_update * self.timed_updates / secs / 1e12 if timed else None,
                "mfu": mfu(flops_per_update, self.timed_updates, secs, num_devices, peak),
                "elapsed_s": round(now - t_start, 3)}


@dataclasses.dataclass
class TrainSummary:
    """What a training run did: `train.run` returns it, process 0 prints it."""

    save_dir: str
    data: str
    start_update: int
    resumed_from: str | None
    mesh: dict
    sequence_parallel: bool
    losses: dict[int, float] = dataclasses.field(default_factory=dict)  # base-2 loss of every update
    train: list[dict] = dataclasses.field(default_factory=list)  # the train log lines
    valid: list[dict] = dataclasses.field(default_factory=list)  # the validation log lines
    checkpoints: list[int] = dataclasses.field(default_factory=list)  # updates saved by this run
    overflows: list[int] = dataclasses.field(default_factory=list)  # fp16: the update each skipped step would have been
    loss_scales: dict[int, float] = dataclasses.field(default_factory=dict)  # fp16: the scale after each update
    stopped_by: str | None = None  # the signal that stopped the run early
    end_update: int | None = None
    elapsed_s: float | None = None

    def report_lines(self, *, no_save: bool, jsonl_path: str | None, tensorboard_logdir: str | None) -> list[str]:
        lines = [f"trained updates {self.start_update} -> {self.end_update} in {self.elapsed_s:.1f}s"
                 + (f" (stopped by {self.stopped_by})" if self.stopped_by else "")]
        if self.valid:
            first, last = self.valid[0], self.valid[-1]
            lines.append(f"validation ppl: first {first['valid_ppl']:.2f} (update {first['update']}), "
                         f"last {last['valid_ppl']:.2f} (update {last['update']})")
        if self.checkpoints:
            lines.append(f"checkpoints: {self.save_dir}/<update>/ (latest: update {self.checkpoints[-1]})")
        elif self.resumed_from:
            lines.append(f"checkpoints: none new (latest: {self.resumed_from})")
        elif no_save:
            lines.append("checkpoints: none (--no-save)")
        lines.append(f"metrics log: {jsonl_path or os.path.join(self.save_dir, 'train_log.jsonl')}")
        if tensorboard_logdir:
            lines.append(f"tensorboard: tensorboard --logdir {tensorboard_logdir}")
        lines.append(f"data: {self.data}")
        return lines


def _fmt(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:.4g}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


class MetricsLogger:
    """Console + JSON lines + optional TensorBoard; a no-op on processes other than 0."""

    def __init__(self, save_dir: str | None, tensorboard_logdir: str | None, *, enabled: bool = True,
                 progress_total: int | None = None, progress_initial: int = 0, progress_bar: bool = True,
                 log_format: str = "tqdm"):
        self.enabled = enabled
        self.log_format = log_format  # console lines: tqdm/simple ("| train | ..."), json (one object), none
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        if save_dir is not None:
            os.makedirs(save_dir, exist_ok=True)
            self.jsonl_path = os.path.join(save_dir, "train_log.jsonl")
            self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if tensorboard_logdir:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(tensorboard_logdir)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=progress_total or None, initial=progress_initial, unit="upd",
                             dynamic_ncols=True, file=sys.stderr, leave=False)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def advance(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def log(self, record: dict, *, prefix: str, tb_keys: tuple = ()) -> None:
        """One log line: `record` (with an `update` key) to every sink; `prefix` names it on the console."""
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        if self.log_format == "json":
            self.print(json.dumps({"phase": prefix, **record}, allow_nan=True))
        elif self.log_format != "none":
            self.print(f"| {prefix} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "update")
                       + f" | update {record['update']}")
        if self._tb is not None:
            for k in tb_keys:  # a record key (tag PREFIX/key) or a (record key, tag) pair
                key, tag = (k, f"{prefix}/{k}") if isinstance(k, str) else k
                v = record.get(key)
                if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self._tb.add_scalar(tag, v, record["update"])
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

"""The training loop behind `python -m m11b_jax.train` (the CLI in `train.py` builds its RunConfig).

One update = one call of the jitted, sharded train step on [update_freq, global_batch, T] tokens. The host
runs one update ahead of the device: it dispatches update n+1 before reading update n's metrics, and only
waits at log, validation and checkpoint points. Each update's loss and gradient norm are checked: a NaN or
inf stops training with an error *before* anything from that update is saved, so the last checkpoint on disk
is the last good one.

Checkpoints (see `checkpoint.py`) hold the whole train state, the data position and the seed, so a resumed
run's updates equal those of a run that never stopped (dropout keys derive from seed and update number).
SIGTERM or SIGINT makes the loop save a checkpoint at the next update boundary and return normally (exit 0);
with several processes, JAX's preemption sync point makes all of them stop at the same update.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time

import jax
import numpy as np

from m11b_jax import checkpoint as ckpt
from m11b_jax import sharding as S
from m11b_jax import train_data as D
from m11b_jax.config import analytic_train_flops
from m11b_jax.errors import UserError
from m11b_jax.train_metrics import MetricsLogger, base2_ppl, mfu, peak_flops
from m11b_jax.train_step import (abstract_train_state, init_train_state, make_eval_loss, make_train_step,
                                 state_from_params, state_shardings)


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN/inf."""


class _StopRequest:
    """SIGTERM/SIGINT -> save at the next update and stop. A second SIGINT interrupts at once."""

    def __init__(self, multi_process: bool):
        self.signal_name: str | None = None
        self.multi_process = multi_process
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        # With several processes JAX's preemption notifier owns SIGTERM (all processes agree on the update to
        # stop at); a SIGINT is forwarded to it as a SIGTERM.
        sigs = (signal.SIGINT,) if self.multi_process else (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        if self.multi_process:
            self.signal_name = "SIGINT"
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.signal_name = signal.Signals(signum).name

    def should_stop(self, update: int) -> bool:
        if self.multi_process:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(update):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


@dataclasses.dataclass
class _Interval:
    """Training statistics since the last log line."""

    nll: float = 0.0
    ntokens: float = 0.0
    gnorm: float = 0.0
    updates: int = 0
    timed_updates: int = 0
    timed_tokens: float = 0.0
    t0: float = 0.0
    paused: float = 0.0  # seconds spent validating / saving, not training


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def train(run) -> dict:
    """Run training as configured by `run` (a train.RunConfig). Returns a summary (per-update losses etc.)."""
    a = run.args
    cfg, ocfg = run.model, run.optim
    is_main = jax.process_index() == 0
    multi = jax.process_count() > 1

    # ---- data, save dir (all cheap checks before any compilation) ----
    if run.offline:
        from m11b_jax.corpus import ensure_offline_corpus

        data_path = str(ensure_offline_corpus())
    else:
        data_path = run.data
    dictionary = D.load_dictionary(data_path, cfg.vocab_size)
    train_blocks = D.load_split(data_path, a.train_subset, run.tokens_per_sample, "--train-subset")
    valid_sets = []
    if not a.disable_validation:
        for name in [s for s in a.valid_subset.split(",") if s]:
            valid_sets.append((name, D.load_split(data_path, name, run.tokens_per_sample, "--valid-subset "
                                                   "(or --disable-validation)")))
    save_dir = ckpt.check_writable(a.save_dir).absolute()

    mesh = S.make_mesh(run.model_parallel_size)
    rules = S.logical_rules(sequence_parallel=run.sequence_parallel)
    batches = D.TrainBatches(train_blocks, mesh, run.batch_size, run.update_freq, seed=a.seed, prefetch=a.num_workers)
    global_rows = batches.global_rows

    # ---- state: resume, fine-tune, or fresh ----
    seed = a.seed
    start = 0
    resumed_from = None
    point = ckpt.find_restore_point(save_dir, a.restore_file)
    if point is not None:
        root, upd = point
        meta = ckpt.read_meta(root, upd)
        ckpt.check_compatible(meta, dataclasses.asdict(cfg), str(root / str(upd)))
        saved_rows = int(meta.get("data", {}).get("global_batch_size", global_rows))
        if saved_rows != global_rows:
            d = mesh.shape[S.DATA]
            fix = (f"pass --batch-size {saved_rows // d}" if saved_rows % d == 0 else
                   f"its global batch is not divisible by the data axis ({d} = devices / --model-parallel-size); "
                   "pick a --model-parallel-size that makes it so")
            raise UserError(f"the checkpoint {root / str(upd)} was trained with a global batch of {saved_rows} blocks, "
                            f"this run has {global_rows} ({run.batch_size} x {d} data replicas): {fix}")
        state, meta = ckpt.restore(root, upd, abstract_train_state(cfg, mesh, rules, ocfg))
        batches.load_state_dict(meta["data"])
        seed = int(meta.get("seed", seed))
        start = int(meta["update"])
        resumed_from = str(root / str(upd))
    elif a.finetune_from_model:
        from m11b_jax import params_io

        saved_cfg = params_io.load_model_config(a.finetune_from_model)
        ckpt.check_compatible({"model_config": dataclasses.asdict(saved_cfg)}, dataclasses.asdict(cfg),
                              a.finetune_from_model)
        with S.activate(mesh, rules):
            params = params_io.load_params(a.finetune_from_model, mesh, rules, cfg=cfg)
        state = state_from_params(params, ocfg, state_shardings(cfg, mesh, rules))
        del params
    else:
        state = init_train_state(cfg, mesh, rules, ocfg, seed=seed)

    rng_impl = a.dropout_rng if a.dropout_rng != "auto" else ("rbg" if jax.default_backend() == "gpu" else "threefry2x32")
    step_fn = make_train_step(cfg, mesh, rules, ocfg, criterion=a.criterion, seed=seed, rng_impl=rng_impl)
    eval_fn = make_eval_loss(cfg, mesh, rules, criterion=a.criterion)
    saver = None if a.no_save else ckpt.Checkpointer(save_dir, keep=a.keep_interval_updates)

    flops_per_update = analytic_train_flops(cfg, global_rows * run.update_freq, run.tokens_per_sample)
    peak = peak_flops(jax.devices()[0].device_kind, cfg.compute_dtype)
    n_dev = jax.device_count()
    logger = MetricsLogger(str(save_dir), a.tensorboard_logdir, enabled=is_main,
                           progress_total=a.max_update or None, progress_initial=start,
                           progress_bar=not a.no_progress_bar)
    stop = _StopRequest(multi)
    stop.install()

    def meta_now(update: int) -> dict:
        return {"update": update, "data": batches.state_dict(), "seed": seed, "model_config": dataclasses.asdict(cfg),
                "optim": dataclasses.asdict(ocfg), "mesh": dict(mesh.shape), "dtype_policy": run.dtype_policy,
                "data_path": os.path.abspath(data_path), "tokens_per_sample": run.tokens_per_sample,
                "update_freq": run.update_freq, "dropout_rng": rng_impl}

    def validate(update: int) -> None:
        for name, blocks in valid_sets:
            t0 = time.perf_counter()
            nll = ntok = 0.0
            for b in D.valid_batches(blocks, mesh, run.batch_size_valid):
                # One batch in flight at a time: queuing hundreds of small collective programs on simulated CPU
                # devices can starve XLA's CPU thread pool (a rendezvous deadlock); the wait costs little.
                loss_sum, count = jax.device_get(eval_fn(state.params, b["source"], b["target"]))
                nll += float(loss_sum)
                ntok += float(count)
            loss = nll / max(ntok, 1.0) / math.log(2)
            rec = {"update": update, "subset": name, "valid_loss": loss, "valid_ppl": base2_ppl(loss),
                   "valid_ntokens": int(ntok), "valid_s": round(time.perf_counter() - t0, 3)}
            summary["valid"].append(rec)
            logger.log(rec, prefix=f"valid on '{name}'", tb_keys=("valid_loss", "valid_ppl"))

    def save(update: int) -> None:
        if saver is not None and saver.save(update, state, meta_now(update)):
            summary["checkpoints"].append(update)

    summary = {"save_dir": str(save_dir), "data": data_path, "start_update": start, "resumed_from": resumed_from,
               "losses": {}, "train": [], "valid": [], "checkpoints": [], "stopped_by": None,
               "mesh": dict(mesh.shape), "sequence_parallel": run.sequence_parallel}
    logger.print(
        f"| {cfg.name}: {cfg.num_params() / 1e6:.2f}M params | mesh {dict(mesh.shape)} on {n_dev} "
        f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es) | sequence parallel "
        f"{run.sequence_parallel} | {run.dtype_policy} | dropout rng {rng_impl} | global batch {global_rows} x {run.tokens_per_sample} tokens"
        f" x update-freq {run.update_freq} | data {data_path} ({train_blocks.num_tokens} train tokens, "
        f"{len(dictionary)} symbols)" + (f" | resumed from {resumed_from}" if resumed_from else ""))

    if multi:  # every process says which rows it reads
        n_shards, shard = D.host_data_share(mesh)
        print(f"| process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local devices, "
              f"reads data shard {shard} of {n_shards} ({global_rows // n_shards} of the {global_rows} rows of each "
              "global batch)", file=sys.stderr, flush=True)

    interval = _Interval(t0=time.perf_counter())
    pending: list[tuple[int, dict]] = []
    t_start = time.perf_counter()
    update = start
    last_validated = last_saved = None

    def drain(keep_last: bool) -> None:
        """Fetch and check the metrics of dispatched updates; log at log-interval boundaries."""
        nonlocal interval
        upto = len(pending) - 1 if keep_last else len(pending)
        if upto <= 0:
            return
        fetched = jax.device_get([m for _, m in pending[:upto]])
        for (u, _), m in zip(pending[:upto], fetched):
            loss, gnorm = float(m["loss"]), float(m["gnorm"])
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                last = saver.last_saved if saver is not None else None
                raise TrainingDiverged(
                    f"loss is {loss} (gradient norm {gnorm}) at update {u}: training stopped; "
                    + (f"the last good checkpoint is {save_dir / str(last)}" if last is not None else "no checkpoint was saved")
                    + "; lower --lr, set --clip-norm, or check the data")
            summary["losses"][u] = loss
            interval.nll += float(m["nll_sum"])
            interval.ntokens += float(m["ntokens"])
            interval.gnorm += gnorm
            interval.updates += 1
            if u == start + 1:  # the first update includes compilation: time from its end
                interval.t0 = time.perf_counter()
                logger.print(f"| first update (compile + run) took {interval.t0 - t_start:.1f}s")
            else:
                interval.timed_updates += 1
                interval.timed_tokens += float(m["ntokens"])
            logger.advance(1, loss=loss)
            if u % a.log_interval == 0 or (a.max_update and u == a.max_update):
                now = time.perf_counter()
                secs = now - interval.t0 - interval.paused
                il = interval.nll / max(interval.ntokens, 1.0) / math.log(2)
                rec = {"update": u, "loss": il, "ppl": base2_ppl(il), "lr": float(m["lr"]),
                       "gnorm": interval.gnorm / interval.updates, "wpb": interval.ntokens / interval.updates,
                       "wps": interval.timed_tokens / secs if interval.timed_updates and secs > 0 else None,
                       "ups": interval.timed_updates / secs if interval.timed_updates and secs > 0 else None,
                       "model_tflops": (flops_per_update * interval.timed_updates / secs / 1e12
                                        if interval.timed_updates and secs > 0 else None),
                       "mfu": mfu(flops_per_update, interval.timed_updates, secs, n_dev, peak),
                       "elapsed_s": round(now - t_start, 3)}
                summary["train"].append(rec)
                logger.log(rec, prefix="train", tb_keys=("loss", "ppl", "lr", "gnorm", "wps", "mfu"))
                interval = _Interval(t0=now)
        del pending[:upto]

    try:
        if run.validate_at_start and start == 0 and valid_sets:
            validate(0)
        while not a.max_update or update < a.max_update:
            batch = batches.next()
            state, metrics = step_fn(state, batch)
            update += 1
            pending.append((update, metrics))
            is_last = bool(a.max_update) and update >= a.max_update
            do_save = bool(a.save_interval_updates) and update % a.save_interval_updates == 0
            do_valid = do_save or (bool(a.validate_interval_updates) and update % a.validate_interval_updates == 0)
            stopping = stop.should_stop(update)
            sync = is_last or do_save or do_valid or stopping or update % a.log_interval == 0
            drain(keep_last=not sync)
            if stopping:
                logger.print(f"| {stop.signal_name} received: saving a checkpoint at update {update} and stopping")
                summary["stopped_by"] = stop.signal_name
                break
            t_pause = time.perf_counter()
            if do_valid and valid_sets:
                validate(update)
                last_validated = update
            if do_save:
                save(update)
                last_saved = update
            interval.paused += time.perf_counter() - t_pause
        drain(keep_last=False)
        if summary["stopped_by"] is None and valid_sets and last_validated != update and update > start:
            validate(update)
        if last_saved != update:
            save(update)
        if saver is not None:
            saver.wait()
    finally:
        stop.restore()
        batches.close()
        if saver is not None:
            try:
                saver.close()  # waits for a save in flight: a good checkpoint is never left half-written
            except Exception:  # noqa: BLE001 - never mask the error that got us here
                pass
        logger.close()

    summary["end_update"] = update
    summary["elapsed_s"] = time.perf_counter() - t_start
    if is_main:
        _print_summary(summary, a, logger)
    return summary


def _print_summary(summary: dict, a, logger: MetricsLogger) -> None:
    lines = [f"trained updates {summary['start_update']} -> {summary['end_update']} in {summary['elapsed_s']:.1f}s"
             + (f" (stopped by {summary['stopped_by']})" if summary["stopped_by"] else "")]
    valid = summary["valid"]
    if valid:
        first, last = valid[0], valid[-1]
        lines.append(f"validation ppl: first {first['valid_ppl']:.2f} (update {first['update']}), "
                     f"last {last['valid_ppl']:.2f} (update {last['update']})")
    if summary["checkpoints"]:
        lines.append(f"checkpoints: {summary['save_dir']}/<update>/ (latest: update {summary['checkpoints'][-1]})")
    elif a.no_save:
        lines.append("checkpoints: none (--no-save)")
    lines.append(f"metrics log: {getattr(logger, 'jsonl_path', os.path.join(summary['save_dir'], 'train_log.jsonl'))}")
    if a.tensorboard_logdir:
        lines.append(f"tensorboard: tensorboard --logdir {a.tensorboard_logdir}")
    lines.append(f"data: {summary['data']}")
    print("\n".join(lines), flush=True)

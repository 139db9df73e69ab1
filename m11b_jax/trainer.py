"""The training loop behind `python -m m11b_jax.train` (the CLI in `train.py` builds its RunConfig).

One update = one call of the jitted, sharded train step on [update_freq, global_batch, T] tokens. The host
runs one update ahead of the device: it dispatches update n+1 before reading update n's metrics, and only
waits at log, validation and checkpoint points. Each update's loss and gradient norm are checked: a NaN or
inf stops training with an error *before* anything from that update is saved, so the last checkpoint on disk
is the last good one (the error names it once its hashes are written: see checkpoint.py). Under the fp16 policies
a non-finite gradient norm is a loss-scale overflow instead: the step changed nothing but the scale (see
train_step), its batch is consumed (like fairseq's), it does not count as an update, and the loop learns the true
update count from each step's metrics; reaching --min-loss-scale stops training with an error.

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

from m11b_jax import checkpoint as ckpt
from m11b_jax import fsutil, params_io, runtime, sharding, train_data
from m11b_jax import precision as P
from m11b_jax.config import analytic_train_flops
from m11b_jax.corpus import ensure_offline_corpus
from m11b_jax.targets import compiler_options
from m11b_jax.errors import UserError
from m11b_jax.train_metrics import (IntervalStats, MetricsLogger, TrainingDiverged, TrainSummary, base2_ppl,
                                    check_finite, peak_flops)
from m11b_jax.train_step import (abstract_train_state, init_train_state, make_eval_loss, make_train_step,
                                 state_from_params, state_shardings)


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


class Trainer:
    """One training run: data, mesh, state, compiled step, checkpoints, metrics. `run()` trains."""

    def __init__(self, run):
        args = self.args = run.args
        self.run_cfg = run
        self.cfg, self.ocfg = run.model, run.optim
        self.is_main = jax.process_index() == 0
        self.t_start = time.perf_counter()

        # Data and the save dir first: every cheap check runs before anything is compiled.
        if run.offline:
            self.data_path = str(ensure_offline_corpus())
        else:
            self.data_path = run.data
        self.dictionary = train_data.load_dictionary(self.data_path, self.cfg.vocab_size)
        n_symbols = len(self.dictionary)
        self.train_blocks = train_data.load_split(self.data_path, args.train_subset, run.tokens_per_sample,
                                                  "--train-subset", n_symbols)
        self.valid_sets = [] if args.disable_validation else [
            (name, train_data.load_split(self.data_path, name, run.tokens_per_sample,
                                         "--valid-subset (or --disable-validation)", n_symbols))
            for name in args.valid_subset.split(",") if name]
        self.save_dir = ckpt.check_writable(args.save_dir).absolute()
        # One run per --save-dir: a second trainer refuses at once (a dead run's lock is taken over).
        self._lock = fsutil.DirectoryLock(self.save_dir, log=self._note).acquire() if self.is_main else None
        try:
            self._setup(run)
        except BaseException:
            self._release_lock()
            raise

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _setup(self, run) -> None:
        args = self.args
        self.mesh = sharding.make_mesh(run.model_parallel_size)
        runtime.retain_host_memory_on_cpu(self.mesh)  # reuse each step's host buffers, not page-fault them in again
        if run.fsdp:
            sharding.check_fsdp(self.cfg, self.mesh)
        self.rules = sharding.logical_rules(sequence_parallel=run.sequence_parallel, fsdp=run.fsdp)
        # fairseq's default scale window depends on the data-parallel size: resolved on this mesh.
        self.loss_scale = None if run.loss_scale is None else run.loss_scale.with_window(
            self.mesh.shape[sharding.DATA], run.update_freq)
        warning = P.warn_if_fp16_on_tpu(run.precision, jax.default_backend())
        if warning and self.is_main:
            print(warning, file=sys.stderr, flush=True)
        self.batches = train_data.TrainBatches(self.train_blocks, self.mesh, run.batch_size, run.update_freq,
                                               seed=args.seed, prefetch=args.num_workers, rules=self.rules)
        self.seed = args.seed
        self.start, self.resumed_from = 0, None
        check_memory(self.cfg, self.mesh, self.rules, self.ocfg, self.loss_scale)
        self.state = self._restore_or_init()
        self.known_update = self.start  # the device's update count up to the last step whose metrics were read

        self.rng_impl = args.dropout_rng if args.dropout_rng != "auto" else (
            "rbg" if jax.default_backend() == "gpu" else "threefry2x32")
        gpu_options = compiler_options(args.gpu_compiler_settings) if jax.default_backend() == "gpu" else None
        self.step_fn = make_train_step(self.cfg, self.mesh, self.rules, self.ocfg, criterion=args.criterion,
                                       seed=self.seed, rng_impl=self.rng_impl, compiler_options=gpu_options,
                                       loss_scale=self.loss_scale)
        self.eval_fn = make_eval_loss(self.cfg, self.mesh, self.rules, criterion=args.criterion)
        self.saver = None if args.no_save else ckpt.Checkpointer(self.save_dir, keep=args.keep_interval_updates)

        global_rows = self.batches.global_rows
        self.flops_per_update = analytic_train_flops(self.cfg, global_rows * run.update_freq, run.tokens_per_sample)
        self.peak = peak_flops(jax.devices()[0].device_kind, self.cfg.compute_dtype)
        self.logger = MetricsLogger(str(self.save_dir), args.tensorboard_logdir, enabled=self.is_main,
                                    progress_total=args.max_update or None, progress_initial=self.start,
                                    progress_bar=not args.no_progress_bar and (args.log_format or "tqdm") == "tqdm",
                                    log_format=args.log_format or "tqdm")
        self.next_lr = self.ocfg.schedule()  # fairseq logs the lr the NEXT update will use
        self.summary = TrainSummary(save_dir=str(self.save_dir), data=self.data_path, start_update=self.start,
                                    resumed_from=self.resumed_from, mesh=dict(self.mesh.shape),
                                    sequence_parallel=run.sequence_parallel)
        self.pending: list[dict] = []  # metrics of dispatched steps, not read yet
        self.interval = IntervalStats()
        self.overflows_in_interval = 0  # loss-scale overflows since the last train log line

    # ---- state ---------------------------------------------------------------------------------------

    def _restore_or_init(self):
        args, cfg, mesh, rules, ocfg = self.args, self.cfg, self.mesh, self.rules, self.ocfg
        resumed = ckpt.resume(self.save_dir, args.restore_file, model_config=cfg,
                              abstract_state=lambda meta, where: self._abstract_state_for(meta, where),
                              global_rows=self.batches.global_rows, data_replicas=mesh.shape[sharding.DATA],
                              batch_size=self.run_cfg.batch_size, log=self._note)
        if resumed is not None:
            self.batches.load_state_dict(resumed.meta["data"])
            self.seed = int(resumed.meta.get("seed", self.seed))
            if self.seed != args.seed:
                self._note(f"| resuming with the checkpoint's seed {self.seed} (not --seed {args.seed}): same data "
                           "order and dropout as the run that saved it")
            if args.finetune_from_model:
                self._note(f"| --finetune-from-model ignored: {self.save_dir} already holds a checkpoint")
            self.start, self.resumed_from = resumed.update, str(resumed.where)
            return resumed.state
        if args.finetune_from_model:
            saved = params_io.load_model_config(args.finetune_from_model)
            ckpt.check_compatible({"model_config": dataclasses.asdict(saved)}, dataclasses.asdict(cfg),
                                  args.finetune_from_model)
            with sharding.activate(mesh, rules):
                params = params_io.load_params(args.finetune_from_model, mesh, rules, cfg=cfg)
            self._note(f"| --finetune-from-model: loaded {fsutil.resolve(args.finetune_from_model)} ({saved.name}, "
                       f"{saved.num_params() / 1e6:.2f}M parameters; a params checkpoint has no update count): "
                       "starting at update 0 with fresh Adam state")
            return state_from_params(params, ocfg, state_shardings(cfg, mesh, rules, self.loss_scale), self.loss_scale)
        return init_train_state(cfg, mesh, rules, ocfg, seed=self.seed, loss_scale=self.loss_scale)

    def _abstract_state_for(self, meta: dict, where):
        """The abstract state to restore into, once the checkpoint's precision is known to be this run's."""
        self._check_precision(meta, where)
        return abstract_train_state(self.cfg, self.mesh, self.rules, self.ocfg, self.loss_scale)

    def _check_precision(self, meta: dict, where) -> None:
        """A run continues in the precision it was trained in (the state's dtypes and its loss scaler)."""
        saved = meta.get("precision")
        if saved is None:  # checkpoints from before the precision policies: fp32 parameters, no loss scaler
            saved = "fp32" if meta.get("model_config", {}).get("compute_dtype", "float32") == "float32" else "bf16"
        ours = self.run_cfg.precision
        same_state = P.POLICIES.get(saved) == P.POLICIES[ours] or (
            saved in ("fp32", "bf16") and ours in ("fp32", "bf16"))  # the same state; only the compute dtype differs
        if not same_state:
            flag = lambda name: "no precision flag" if name == "fp32" else "--" + name.replace("_", "-")  # noqa: E731
            raise UserError(f"the checkpoint {where} was trained with {flag(saved)}, this run has {flag(ours)}: "
                            f"continue it with {flag(saved)}, or use a new --save-dir")

    def _meta(self, update: int) -> dict:
        run = self.run_cfg
        meta = ckpt.training_meta(update, data_state=self.batches.state_dict(), seed=self.seed, model_config=self.cfg,
                                  optim_config=self.ocfg, mesh_shape=self.mesh.shape, dtype_policy=run.dtype_policy,
                                  data_path=self.data_path, tokens_per_sample=run.tokens_per_sample,
                                  update_freq=run.update_freq, dropout_rng=self.rng_impl)
        return dict(meta, precision=run.precision,
                    loss_scale_config=dataclasses.asdict(self.loss_scale) if self.loss_scale else None)

    def _save(self, update: int) -> None:
        if self.saver is not None and self.saver.save(update, self.state, self._meta(update)):
            self.summary.checkpoints.append(update)

    # ---- validation and metrics ----------------------------------------------------------------------

    def _validate(self, update: int) -> None:
        for name, blocks in self.valid_sets:
            t0 = time.perf_counter()
            nll = ntok = 0.0
            for b in train_data.valid_batches(blocks, self.mesh, self.run_cfg.batch_size_valid, self.rules):
                # One batch in flight at a time: queuing hundreds of small collective programs on simulated CPU
                # devices can starve XLA's CPU thread pool (a rendezvous deadlock); the wait costs little.
                loss_sum, count = jax.device_get(self.eval_fn(self.state.params, b["source"], b["target"]))
                nll += float(loss_sum)
                ntok += float(count)
            loss = nll / max(ntok, 1.0) / math.log(2)
            rec = {"update": update, "subset": name, "valid_loss": loss, "valid_ppl": base2_ppl(loss),
                   "valid_ntokens": int(ntok), "valid_s": round(time.perf_counter() - t0, 3)}
            self.summary.valid.append(rec)
            self.logger.log(rec, prefix=f"valid on '{name}'",
                            tb_keys=(("valid_loss", f"{name}/loss"), ("valid_ppl", f"{name}/ppl")))

    def _drain(self, keep_last: bool) -> None:
        """Read and check the metrics of dispatched updates (all, or all but the newest); log on boundaries."""
        upto = len(self.pending) - 1 if keep_last else len(self.pending)
        if upto <= 0:
            return
        fetched = jax.device_get(self.pending[:upto])
        for m in fetched:
            self._account(m)
            del self.pending[0]

    def _account(self, metrics: dict) -> None:
        update = int(metrics["update"])  # the device's count after this step (unchanged by an overflowing step)
        loss, gnorm = float(metrics["loss"]), float(metrics["gnorm"])
        scale = float(metrics["loss_scale"]) if "loss_scale" in metrics else None
        if scale is not None:
            if float(metrics["min_scale_reached"]):
                raise TrainingDiverged(
                    f"minimum loss scale reached (--min-loss-scale {self.loss_scale.min_scale:g}) after update "
                    f"{update}: the loss is probably exploding; training stopped; " + self._last_verified()
                    + "; lower --lr, set --clip-norm or raise the batch size")
            if float(metrics["overflow"]):
                self.known_update = update
                self.overflows_in_interval += 1
                self.summary.overflows.append(update + 1)
                self.logger.log({"update": update, "overflow": 1, "loss_scale": scale},
                                prefix="gradient overflow, update skipped, loss scale lowered", tb_keys=("loss_scale",))
                return
            self.summary.loss_scales[update] = scale
        check_finite(update, loss, gnorm, self._last_verified)
        self.known_update = update
        self.summary.losses[update] = loss
        first = update == self.start + 1  # includes compilation: timing starts at its end
        self.interval.add(float(metrics["nll_sum"]), float(metrics["ntokens"]), gnorm, timed=not first)
        if first:
            self.interval.t0 = time.perf_counter()
            self._note(f"| first update (compile + run) took {self.interval.t0 - self.t_start:.1f}s")
        self.logger.advance(1, loss=loss)
        if update % self.args.log_interval == 0 or (self.args.max_update and update == self.args.max_update):
            now = time.perf_counter()
            # fairseq's convention: after update u the scheduler has already set the rate of update u + 1, and
            # that is the logged lr (the schedule's value at u completed updates).
            rec = self.interval.record(update, float(self.next_lr(update)), now, flops_per_update=self.flops_per_update,
                                       num_devices=jax.device_count(), peak=self.peak, t_start=self.t_start)
            tb_keys = ("loss", "ppl", "lr", "gnorm", "wps", "mfu")
            if scale is not None:
                rec.update(loss_scale=scale, overflows=self.overflows_in_interval)
                tb_keys += ("loss_scale",)
            self.summary.train.append(rec)
            self.logger.log(rec, prefix="train", tb_keys=tb_keys)
            self.interval = IntervalStats(t0=now)
            self.overflows_in_interval = 0

    def _last_verified(self) -> str:
        """Where a stopped run can restart: a save in flight is finished and hashed first (it holds a state from
        before the failing update), so the checkpoint named is one that verifies."""
        last = None
        if self.saver is not None:
            try:
                self.saver.wait()
            except UserError:  # that save failed (e.g. a full disk): the divergence is the error to report
                pass
            last = self.saver.last_verified
        return f"the last verified checkpoint is {self.save_dir / str(last)}" if last is not None else \
            "no checkpoint was saved"

    def _note(self, message: str) -> None:
        if hasattr(self, "logger"):
            self.logger.print(message)  # a no-op on processes other than 0
        elif self.is_main:
            print(message, file=sys.stderr, flush=True)

    def _header(self) -> None:
        run, cfg, rows = self.run_cfg, self.cfg, self.batches.global_rows
        self._note(startup_summary(run, self.mesh, rows))
        self._note(
            f"| {cfg.name}: {cfg.num_params() / 1e6:.2f}M params | mesh {dict(self.mesh.shape)} on "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s), {jax.process_count()} process(es) | "
            f"sequence parallel {run.sequence_parallel} | fsdp {run.fsdp} | {run.dtype_policy} | "
            f"dropout rng {self.rng_impl} | "
            f"global batch {rows} x {run.tokens_per_sample} tokens x update-freq {run.update_freq} | data "
            f"{self.data_path} ({self.train_blocks.num_tokens} train tokens, {len(self.dictionary)} symbols)"
            + (f" | resumed from {self.resumed_from}" if self.resumed_from else ""))
        if jax.process_count() > 1:  # every process says which rows it reads
            n_shards, shard = train_data.host_data_share(self.mesh)
            print(f"| process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local "
                  f"devices, reads data shard {shard} of {n_shards} ({rows // n_shards} of the {rows} rows of each "
                  "global batch)", file=sys.stderr, flush=True)

    # ---- the loop ------------------------------------------------------------------------------------

    def run(self) -> TrainSummary:
        args, summary = self.args, self.summary
        stop = _StopRequest(jax.process_count() > 1)
        stop.install()
        update, last_validated, last_saved = self.start, None, None
        try:
            self._header()
            if self.run_cfg.validate_at_start and self.start == 0 and self.valid_sets:
                self._validate(0)
            if args.max_update and self.start >= args.max_update:
                self._note(f"| already at --max-update {args.max_update} (resumed from {self.resumed_from}): nothing "
                           "to train; raise --max-update to continue, or use a new --save-dir to start over")
            self.interval = IntervalStats(t0=time.perf_counter())
            dispatched = 0
            while not args.max_update or update < args.max_update:
                self.state, metrics = self.step_fn(self.state, self.batches.next())
                dispatched += 1
                self.pending.append(metrics)
                stopping = stop.should_stop(dispatched)
                # Keep one update in flight, except where its result is needed now (a good state to save included).
                # `update` counts the step in flight as an update; after an overflow it is one less than that, so
                # every boundary is met by the exact count once all metrics are read.
                self._drain(keep_last=True)
                for _ in range(2):
                    update = self.known_update + len(self.pending)
                    new = update > self.start  # overflows only: no update since the start yet
                    is_last = bool(args.max_update) and update >= args.max_update
                    do_save = (new and bool(args.save_interval_updates) and update % args.save_interval_updates == 0
                               and last_saved != update)
                    do_valid = do_save or (new and bool(args.validate_interval_updates)
                                           and update % args.validate_interval_updates == 0
                                           and last_validated != update)
                    if not (is_last or do_save or do_valid or stopping or (new and update % args.log_interval == 0)):
                        break
                    self._drain(keep_last=False)
                if stopping:
                    self._note(f"| {stop.signal_name} received: saving a checkpoint at update {update} and stopping")
                    summary.stopped_by = stop.signal_name
                    break
                t_pause = time.perf_counter()
                if do_valid and self.valid_sets:
                    self._validate(update)
                    last_validated = update
                if do_save:
                    self._save(update)
                    last_saved = update
                self.interval.paused += time.perf_counter() - t_pause
            self._drain(keep_last=False)
            update = self.known_update
            if summary.stopped_by is None and self.valid_sets and last_validated != update and update > self.start:
                self._validate(update)
            if last_saved != update:
                self._save(update)
            if self.saver is not None:
                self.saver.wait()
        finally:
            stop.restore()
            self.batches.close()
            if self.saver is not None:
                try:
                    self.saver.close()  # waits for a save in flight: a good checkpoint is never left half-written
                except Exception:  # noqa: BLE001 - never mask the error that got us here
                    pass
            self.logger.close()
            self._release_lock()
        summary.end_update = update
        summary.elapsed_s = time.perf_counter() - self.t_start
        if self.is_main:
            lines = summary.report_lines(no_save=args.no_save, jsonl_path=getattr(self.logger, "jsonl_path", None),
                                         tensorboard_logdir=args.tensorboard_logdir)
            print("\n".join(lines), flush=True)
        return summary


def check_memory(cfg, mesh, rules, ocfg, loss_scale=None, available: int | None = None) -> None:
    """Refuse, before anything is allocated, a train state (parameters + Adam moments) larger than the memory of
    the devices that would hold it: host RAM for CPU devices (they share it), `memory_stats` on accelerators.
    Activations come on top; `--compile-only` gives the full figure."""
    from m11b_jax.aot import bytes_per_device

    per_device = bytes_per_device(abstract_train_state(cfg, mesh, rules, ocfg, loss_scale))
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    cpu = local[0].platform == "cpu"
    if available is None:
        if cpu:
            import psutil

            available = psutil.virtual_memory().available
        else:
            available = (local[0].memory_stats() or {}).get("bytes_limit")
    if available is None:
        return
    need = per_device * (len(local) if cpu else 1)
    if need <= available:
        return
    where = (f"of host memory for {len(local)} CPU devices ({per_device / 2**30:.1f} GiB each), but "
             f"{available / 2**30:.1f} GiB are available" if cpu else
             f"per device, but a {local[0].device_kind} holds {available / 2**30:.1f} GiB")
    raise UserError(f"{cfg.name}'s train state (parameters + Adam moments) needs {need / 2**30:.1f} GiB {where}: "
                    "measure the whole step first with --compile-only, then use more devices or a larger "
                    "--model-parallel-size (or a smaller --arch); --remat-policy and --bf16 lower the activations on "
                    "top of this")


def startup_summary(run, mesh, global_rows: int) -> str:
    """One line: devices, mesh, per-device and global batch (blocks and tokens per update) and how it was derived."""
    devices = mesh.devices.flat
    d, mp, b, t, uf = mesh.shape[sharding.DATA], mesh.shape[sharding.MODEL], run.batch_size, run.tokens_per_sample, run.update_freq
    return (f"| {len(devices)} {devices[0].platform} device(s), mesh data {d} x model {mp} | per device: {b} blocks x "
            f"{t} tokens = {b * t} tokens per micro-batch (from {run.batch_from}) | global: {b} x {d} data replicas "
            f"x update-freq {uf} = {global_rows * uf} blocks = {global_rows * uf * t} tokens per update | "
            f"model {run.model.name}: d {run.model.d_model}, ffn {run.model.ffn_dim}, layers {run.model.num_layers}, "
            f"heads {run.model.num_heads}, vocab {run.model.vocab_size}, init {run.model.init}, remat "
            f"{run.model.remat_policy}, attention {run.model.attention_impl} | lr scheduler {run.optim.lr_scheduler}")


def train(run) -> TrainSummary:
    """Run training as configured by `run` (a train.RunConfig). Returns its summary (per-update losses etc.)."""
    return Trainer(run).run()

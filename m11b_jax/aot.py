"""Ahead-of-time compile of the real-size train and eval steps, without allocating them: memory, collectives, FLOPs.

The step is lowered from abstract inputs (ShapeDtypeStructs carrying shardings) and compiled for the
devices of the mesh: 8 simulated CPU devices, GPUs described by a target description, or a whole TPU slice
described by libtpu (no GPU or TPU needed; see m11b_jax.targets).
"""

from __future__ import annotations

import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from m11b_jax import sharding
from m11b_jax.config import ModelConfig, analytic_train_flops
from m11b_jax.errors import UserError
from m11b_jax.param_tree import abstract_params
from m11b_jax.score_step import default_attention_chunk, default_passes, make_score_step, matmul_precision
from m11b_jax.train_step import OptimConfig, abstract_train_state, batch_shardings, make_train_step

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_WHILE_BODY = re.compile(r"\bwhile\(.*?body=%?([\w.\-]+)")


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays (abstract or real): each leaf's shard."""
    return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def _group_size(line: str) -> int | None:
    """Devices per replica group of a collective, from any of XLA's printed forms (None: unknown)."""
    m = re.search(r"replica_groups=\{(\{[^}]*\}(?:,\{[^}]*\})*)\}", line)
    if m:
        return max(len(g.split(",")) for g in re.findall(r"\{([^}]*)\}", m.group(1)))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = dict((k.strip("'"), int(v)) for k, v in re.findall(r"('?[\w]+'?)=(\d+)", m.group(1)))
        size = 1
        for axis in re.findall(r"'?(\w+)'?", m.group(2)):
            size *= sizes.get(axis, 1)
        return size
    return None


def _result_shapes(shape: str) -> list[str]:
    return re.findall(r"\w+\[[\d,]*\]", shape)


def _empty() -> dict:
    return {k: {"count": 0, "shapes": []} for k in COLLECTIVES}


def _add(into: dict, kind: str, shapes: list[str], count: int = 1) -> None:
    into[kind]["count"] += count
    into[kind]["shapes"] += [s for s in shapes if s not in into[kind]["shapes"]]


def collectives(hlo_text: str, split_loops: bool = False) -> dict:
    """Per collective kind: instruction `count` and distinct result `shapes`; no-op (1-device) groups are skipped.

    With split_loops, returns {"loop_bodies": {body name: per-kind dict}, "outside": per-kind dict}: the
    collectives inside each while-loop body (the scanned layer stack's forward and backward loops) apart
    from the rest of the program.
    """
    bodies = set(_WHILE_BODY.findall(hlo_text))
    per_body: dict = {}
    outside = _empty()
    comp = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):  # a computation's header
            comp = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else "ENTRY"
            continue
        m = _OP.search(line)
        if not m or _group_size(line) == 1:
            continue
        where = per_body.setdefault(comp, _empty()) if comp in bodies else outside
        _add(where, m.group(2), _result_shapes(m.group(1)))
    if split_loops:
        return {"loop_bodies": per_body, "outside": outside}
    merged = _empty()
    for part in [outside, *per_body.values()]:
        for k, v in part.items():
            _add(merged, k, v["shapes"], v["count"])
    return merged


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    args, outs, temps = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
    alias = getattr(m, "alias_size_in_bytes", 0)
    return {"arguments": args, "outputs": outs, "temporaries": temps, "aliased": alias,
            "total": args + outs - alias + temps, "generated_code": m.generated_code_size_in_bytes}


def compiled_cost(compiled) -> dict:
    """XLA's own count of one device's work in the compiled program (None where the backend gives none).

    XLA's cost analysis counts a while loop's body once, not once per iteration: the scanned layer stack's
    forward and backward bodies appear as one layer each (measured on a TPU target: the tiny model with 2 and
    with 4 scanned layers gives the same FLOPs to 0.4%). Compare with the analytic `flops_per_step`."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        cost = None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    cost = cost or {}
    return {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}


def compile_train_step(cfg: ModelConfig, mesh, *, batch_size: int, tokens_per_sample: int, update_freq: int = 1,
                       sequence_parallel: bool = False, ocfg: OptimConfig | None = None,
                       criterion: str = "vocab_parallel_cross_entropy", compiler_options: dict | None = None,
                       loss_scale=None, fsdp: bool = False):
    """Lower and compile the train step for `mesh` from abstract inputs. batch_size is per data replica;
    compiler_options: XLA options for this compile (e.g. targets.GPU_COMPILER_SETTINGS); loss_scale: a resolved
    precision.LossScaleConfig for the fp16 policies (None: no loss scaling); fsdp: weights and Adam state also
    split over `data`."""
    ocfg = ocfg or OptimConfig()
    if fsdp:
        sharding.check_fsdp(cfg, mesh)
    rules = sharding.logical_rules(sequence_parallel=sequence_parallel, fsdp=fsdp)
    state = abstract_train_state(cfg, mesh, rules, ocfg, loss_scale)
    global_batch = batch_size * mesh.shape[sharding.DATA]
    bs = batch_shardings(mesh, rules)
    batch = {k: jax.ShapeDtypeStruct((update_freq, global_batch, tokens_per_sample), jnp.int32, sharding=bs[k])
             for k in ("source", "target")}
    step = make_train_step(cfg, mesh, rules, ocfg, criterion=criterion, loss_scale=loss_scale)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile(compiler_options or None)
    return compiled, time.perf_counter() - t0


def compile_report(cfg: ModelConfig, mesh, *, batch_size: int, tokens_per_sample: int, update_freq: int = 1,
                   sequence_parallel: bool = False, ocfg: OptimConfig | None = None, target: str | None = None,
                   criterion: str = "vocab_parallel_cross_entropy", loss_scale=None, fsdp: bool = False) -> dict:
    """The JSON-able report printed by `python -m m11b_jax.train --compile-only`."""
    compiled, secs = compile_train_step(cfg, mesh, batch_size=batch_size, tokens_per_sample=tokens_per_sample,
                                        update_freq=update_freq, sequence_parallel=sequence_parallel, ocfg=ocfg,
                                        criterion=criterion, loss_scale=loss_scale, fsdp=fsdp)
    global_tokens = batch_size * mesh.shape[sharding.DATA] * tokens_per_sample * update_freq
    hlo = compiled.as_text()
    split = collectives(hlo, split_loops=True)
    in_loops = {k: sum(b[k]["count"] for b in split["loop_bodies"].values()) for k in COLLECTIVES}
    # A collective whose result is a whole [layers, ...] stack (a weight stack gathered, gradients reduced at once).
    whole_stacks = sorted({s for part in [split["outside"], *split["loop_bodies"].values()] for v in part.values()
                           for s in v["shapes"] if re.fullmatch(rf"\w+\[{cfg.num_layers},\d+,\d+(,\d+)*\]", s)})
    return {
        "arch": cfg.name,
        "params": cfg.num_params(),
        "mesh": sharding.describe(mesh),
        "target": target or mesh.devices.flat[0].platform,
        "batch_size_per_replica": batch_size,
        "tokens_per_sample": tokens_per_sample,
        "update_freq": update_freq,
        "tokens_per_step": global_tokens,
        "per_device_bytes": memory(compiled),
        "collectives": collectives(hlo),
        "collectives_inside_layer_loops": {k: v for k, v in in_loops.items() if v},
        "whole_layer_stack_collectives": whole_stacks,
        "flops_per_step": analytic_train_flops(cfg, global_tokens // tokens_per_sample, tokens_per_sample),
        "flops_formula": "6*N_matmul*tokens + 3*(4*L*T*d*tokens)  (N_matmul = L*(4d^2+2*d*ffn) + V*d; "
                         "attention QK^T and PV at 2 FLOPs/MAC, forward x3 for fwd+bwd; remat recompute excluded)",
        # XLA's cost analysis of the program one device runs: each layer loop's body counted once (see above).
        "compiled_per_device": compiled_cost(compiled),
        "compile_s": round(secs, 2),
        "remat_policy": cfg.remat_policy,
        "sequence_parallel": sequence_parallel,
        "fsdp": fsdp,
        "param_dtype": cfg.param_dtype,
        "compute_dtype": cfg.compute_dtype,
        "loss_scaling": loss_scale is not None,
    }


def compile_eval_report(cfg: ModelConfig, mesh, *, batch_size: int, tokens_per_sample: int, context_window: int,
                        attention_chunk: int | None = None, passes: int | None = None) -> dict:
    """Lower and compile eval_lm's scoring step from abstract params (nothing allocated) and report its memory.
    Each window scores tokens_per_sample - context_window targets (eval_lm.ContextWindows checks the flags)."""
    rules = sharding.logical_rules()
    platform = mesh.devices.flat[0].platform
    chunk = attention_chunk or default_attention_chunk(platform)
    passes = passes or default_passes(platform, batch_size)
    global_batch = batch_size * mesh.shape[sharding.DATA]
    rows = sharding.batch_sharding(mesh, 2, rules=rules)
    abstract = abstract_params(cfg, mesh, rules)
    batch = (jax.ShapeDtypeStruct((global_batch, tokens_per_sample), jnp.int32, sharding=rows),
             jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1, rules=rules)),
             jax.ShapeDtypeStruct((global_batch, tokens_per_sample - context_window), jnp.int32,
                                  sharding=rows))
    t0 = time.perf_counter()
    with sharding.activate(mesh, rules), matmul_precision(cfg):
        compiled = make_score_step(cfg, mesh, rules, chunk, passes).lower(abstract, *batch).compile()
    return {
        "arch": cfg.name,
        "params": cfg.num_params(),
        "mesh": sharding.describe(mesh),
        "param_dtype": cfg.param_dtype,
        "compute_dtype": cfg.compute_dtype,
        "batch_size_per_replica": batch_size,
        "tokens_per_sample": tokens_per_sample,
        "context_window": context_window,
        "attention_chunk": chunk,
        "passes": passes,
        "param_bytes_per_device": bytes_per_device(abstract),
        "per_device_bytes": memory(compiled),
        "collectives": {k: v for k, v in collectives(compiled.as_text()).items() if v["count"]},
        "compile_s": round(time.perf_counter() - t0, 2),
    }


def check_fits(report: dict, device_memory_gb: float) -> None:
    total = report["per_device_bytes"]["total"]
    if total > device_memory_gb * 2**30:
        raise UserError(
            f"the train step needs {total / 2**30:.2f} GiB per device, more than --device-memory-gb "
            f"{device_memory_gb:g}: raise --model-parallel-size, lower --batch-size, use --remat-policy full, "
            "enable --sequence-parallel, or shard weights and Adam state over the data axis too (--fsdp)")


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2)


def compile_only_mesh(target: str | None, model_parallel_size: int):
    """The mesh of an eval or decode `--compile-only` (call before JAX computes anything): one model-parallel
    group (per-device memory is the same for every data-parallel replica) of simulated CPU devices or of the
    GPUs `target` names, or the whole TPU slice it names (all its chips and hosts; this process itself then runs
    on its CPU only, and libtpu describes the slice)."""
    from m11b_jax import targets as T
    from m11b_jax.runtime import backends_initialized, configure_cpu_devices, force_cpu_platform

    if target is not None:
        T.check_target(target)
    if T.is_tpu(target):
        force_cpu_platform()
    if not backends_initialized():  # simulated CPU devices for the mesh (a GPU/TPU backend is unaffected)
        configure_cpu_devices(max(jax.config.jax_num_cpu_devices, model_parallel_size))
    return target_mesh(target, None if T.is_tpu(target) else model_parallel_size, model_parallel_size)


def add_target_headroom(report: dict, target: str | None) -> dict:
    """The compiled target's memory per device and the fraction the report's per-device total leaves free."""
    report["target"] = target or report.get("target")
    if target:
        from m11b_jax.targets import memory_bytes

        report["device_memory_gib"] = round(memory_bytes(target) / 2**30, 2)
        report["headroom_fraction"] = round(1 - report["per_device_bytes"]["total"] / memory_bytes(target), 4)
    return report


def target_mesh(target: str | None, n_devices: int | None, model_parallel_size: int):
    """A (data, model) mesh of `n_devices` for an ahead-of-time compile: the GPUs named by `target` or the
    whole TPU slice it names (None: all its chips; no GPU or TPU needed, see m11b_jax.targets), or this host's
    devices when target is None."""
    from m11b_jax import targets as T

    if target is not None:
        T.check_target(target)
    if T.is_tpu(target):
        chips = T.TPU_TARGETS[target].chips
        if n_devices not in (None, chips):
            raise UserError(f"--target {target} is a slice of {chips} chips, not {n_devices} devices: "
                            f"pass --distributed-world-size {chips} or omit it")
        return sharding.make_mesh(model_parallel_size, T.tpu_slice_devices(target))
    n_devices = n_devices or 8
    if target is None:
        devices = jax.devices()
        if len(devices) < n_devices:
            raise UserError(
                f"{n_devices} devices requested but only {len(devices)} present: simulate CPU devices with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={n_devices}")
        return sharding.make_mesh(model_parallel_size, devices[:n_devices])
    from m11b_jax.targets import target_devices

    return sharding.make_mesh(model_parallel_size, target_devices(target, n_devices))

"""Process-level JAX setup for the commands: which platform, how many simulated CPU devices, several hosts.

Everything here must run before the first JAX computation (the backends read these settings once):

* `configure_cpu_devices(n)`: with no accelerator, JAX's CPU backend is split into `n` simulated devices
  (default 8 for training) so the same (data, model) mesh code runs on a laptop.
* `maybe_initialize_distributed(...)`: `jax.distributed.initialize` when the process is one of several:
  an explicit coordinator (flags or `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`), or a
  launcher JAX knows how to read (SLURM `srun`, Open MPI `mpirun`, Cloud TPU pod slices: JAX's own cluster
  auto-detection fills in the coordinator, process count and index).

And, at any time: `retain_host_memory()`, the glibc allocator setting that CPU training and evaluation apply
(`retain_host_memory_on_cpu(mesh)`).
"""

from __future__ import annotations

import ctypes
import os
import sys

from m11b_jax.errors import UserError


def backends_initialized() -> bool:
    """Whether JAX has started its backends (after which device settings are fixed). Unknown: False."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # a private API: if it moves, the config updates below report a late call themselves
        return False


def force_cpu_platform() -> None:
    """Use only the CPU backend (e.g. for `--compile-only`, which never needs an accelerator)."""
    import jax

    if backends_initialized():
        if jax.default_backend() != "cpu":
            raise UserError("JAX already runs on an accelerator in this process: start a new process with JAX_PLATFORMS=cpu")
        return
    jax.config.update("jax_platforms", "cpu")


def configure_cpu_devices(n: int) -> None:
    """Ask the CPU backend for `n` simulated devices (no effect on GPU/TPU devices)."""
    import jax

    if n < 1:
        raise UserError(f"the number of CPU devices must be >= 1, got {n}")
    if jax.config.jax_num_cpu_devices == n:
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backends already started in this process
        have = len(jax.devices("cpu"))
        if have != n:
            raise UserError(
                f"JAX's CPU backend already started with {have} devices in this process, {n} are needed: "
                f"run in a fresh process (or set jax_num_cpu_devices={n} before any JAX computation)") from None


def retain_host_memory() -> bool:
    """Let the C allocator keep freed host memory for reuse (glibc only; returns whether it applied).

    XLA:CPU allocates each execution's temporary buffer (hundreds of MB for a train step) and frees it at the
    end; glibc serves blocks that large with a fresh mmap, so every step page-faults the whole buffer in again
    (~0.2 s of kernel time per step for the CPU benchmark's model on 2 cores). One malloc arena, no mmap'd
    blocks and no trimming make the second step reuse the first step's pages. Costs: the process keeps its
    peak heap. Process-wide: call it once the CPU backend is known to be the one in use. Opt out with
    M11B_RETAIN_HOST_MEMORY=0."""
    if os.environ.get("M11B_RETAIN_HOST_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # absent on non-glibc C libraries (e.g. musl)
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's <malloc.h> constants
    return bool(mallopt(m_arena_max, 1) and mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**31 - 1))


def retain_host_memory_on_cpu(mesh) -> bool:
    """`retain_host_memory()` when `mesh` is made of CPU devices (training and evaluation call this)."""
    return mesh.devices.flat[0].platform == "cpu" and retain_host_memory()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer: fix or unset it") from None


def launcher_detected() -> str | None:
    """Name of a multi-process launcher whose environment JAX can read, or None."""
    if (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return "SLURM"
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "Open MPI"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "Cloud TPU pod"
    return None


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, force: bool = False) -> bool:
    """Connect this process to the others; returns True when `jax.distributed.initialize` ran.

    Runs when a coordinator or process count is given (arguments, else JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID), when `force` is set (let JAX auto-detect everything, e.g. on a TPU
    pod slice whose environment has no variables to look at), or when a known launcher is detected.
    """
    import jax

    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    launcher = launcher_detected()
    if not (explicit or force or launcher):
        return False
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num-processes {num_processes} must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise UserError(f"--process-id {process_id} is not in 0..{num_processes - 1}: give each process its own index")
    if explicit and launcher is None and (coordinator_address is None or num_processes is None or process_id is None):
        raise UserError(
            "several processes need all of --coordinator-address HOST:PORT, --num-processes N and --process-id I "
            "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    if backends_initialized():
        raise UserError("JAX started before jax.distributed.initialize: run the command in a fresh process")
    # CPU processes exchange collectives over gloo (a no-op setting for GPU/TPU devices).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not join the other processes ({first}): check --coordinator-address, "
                        "--num-processes and --process-id, and that process 0 is running") from None
    return True

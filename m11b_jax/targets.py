"""Descriptions of GPUs and TPU slices we compile for ahead of time, without one present (`--target h100`,
`--target v5e-16`).

GPUs: JAX's CUDA plugin (`pip install -e .[cuda-aot]`; no driver or CUDA libraries needed) builds a device
topology from an XLA `GpuTargetConfigProto`; we fill one in from this small table. The figures are the
chips' public specifications (as in XLA's xla/backends/gpu/target_config/specs/*.txtpb).

TPUs: libtpu (`pip install -e .[tpu-aot]`) describes a whole slice, every host of it, from its topology name
(`jax.experimental.topologies.get_topology_desc`); the train step then compiles for that slice on a CPU-only
machine. Slices are named as Cloud TPU names them: v4 and v5p count TensorCores (v4-16 = 8 chips, each chip
one JAX device with its two cores as one "megacore"), v5e and v6e count chips.
"""

from __future__ import annotations

import dataclasses
import os

from m11b_jax.errors import UserError

# name: (description, compute capability, SMs, memory bytes, memory bandwidth B/s, L2 bytes, shared mem/SM, clock GHz)
TARGETS = {
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 132, 84942979072, 3352320000000, 52428800, 233472, 1.98),
    "h200": ("NVIDIA H200 141GB HBM3e", (9, 0), 132, 151397597184, 4800000000000, 52428800, 233472, 1.98),
    "a100": ("NVIDIA A100-SXM4-80GB", (8, 0), 108, 85100068864, 2039040000000, 41943040, 167936, 1.41),
    # The seed's cards (Volta: fp16 tensor cores, no bf16 ones; use --fp16 or --memory-efficient-fp16).
    "v100": ("Tesla V100-SXM2-32GB", (7, 0), 80, 34089730048, 900000000000, 6291456, 98304, 1.53),
}

# Dense bf16 peak FLOP/s per chip by device_kind substring (for MFU); unknown kinds give null.
PEAK_BF16_FLOPS = {  # the first key found in device_kind wins: specific names before general ones
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p chips report device_kind "TPU v5" (v5e: "TPU v5 lite", matched above)
    "TPU v6": 918e12,  # v6e: "TPU v6 lite"
}


# Named XLA:GPU compiler settings, passed as `compiler_options` when the train step is compiled; each one is
# measurable on or off (benchmarks/gpu_mfu_sweep.py). "default" leaves XLA's own defaults.
GPU_COMPILER_SETTINGS = {
    "default": {},
    # cuBLAS for every matmul instead of autotuned Triton GEMM fusions (fewer, larger library GEMMs)
    "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},
    # overlap collectives with compute (multi-GPU meshes)
    "latency_hiding": {"xla_gpu_enable_latency_hiding_scheduler": True},
    # launch each step's kernels from CUDA graphs where XLA can (fewer launch gaps between small kernels)
    "command_buffers": {"xla_gpu_graph_min_graph_size": 1},
    "all": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_latency_hiding_scheduler": True,
            "xla_gpu_graph_min_graph_size": 1},
}


def compiler_options(name: str) -> dict:
    if name not in GPU_COMPILER_SETTINGS:
        raise UserError(f"unknown GPU compiler settings {name!r}: choose one of {', '.join(GPU_COMPILER_SETTINGS)}")
    return dict(GPU_COMPILER_SETTINGS[name])


def peak_flops(device_kind: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS.items():
        if key.lower() in device_kind.lower():
            return flops
    return None


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One Cloud TPU slice: what libtpu needs to describe it, and its per-chip figures."""

    topology: str  # libtpu's topology name, "<generation>:<chip grid>"
    chip_config: str  # "megacore" (v4, v5p: one device per chip) or "default"
    chips_per_host: tuple[int, int, int]  # chip grid of one host (its VM)
    chips: int
    hbm_gib: float  # HBM per chip
    device_kind: str  # what its devices report (keys PEAK_BF16_FLOPS)

    @property
    def hosts(self) -> int:
        return self.chips // (self.chips_per_host[0] * self.chips_per_host[1] * self.chips_per_host[2])


# Per-chip HBM and the bf16 peaks (PEAK_BF16_FLOPS) are Google's published figures for each generation.
TPU_TARGETS = {
    "v4-8": TpuSlice("v4:2x2x1", "megacore", (2, 2, 1), 4, 32, "TPU v4"),
    "v4-16": TpuSlice("v4:2x2x2", "megacore", (2, 2, 1), 8, 32, "TPU v4"),
    "v5e-8": TpuSlice("v5e:2x4", "default", (2, 4, 1), 8, 16, "TPU v5 lite"),
    "v5e-16": TpuSlice("v5e:4x4", "default", (2, 2, 1), 16, 16, "TPU v5 lite"),
    "v5p-8": TpuSlice("v5:2x2x1", "megacore", (2, 2, 1), 4, 95, "TPU v5"),
    "v5p-16": TpuSlice("v5:2x2x2", "megacore", (2, 2, 1), 8, 95, "TPU v5"),
    "v6e-8": TpuSlice("v6e:2x4", "default", (2, 4, 1), 8, 32, "TPU v6 lite"),
}


def known_targets() -> list[str]:
    return sorted(TARGETS) + list(TPU_TARGETS)


def check_target(name: str) -> None:
    if name not in TARGETS and name not in TPU_TARGETS:
        raise UserError(f"unknown --target {name!r}: choose one of {', '.join(known_targets())}")


def is_tpu(name: str | None) -> bool:
    return name in TPU_TARGETS


def memory_bytes(name: str) -> int:
    """Memory of one device of the target (HBM per chip for a TPU slice)."""
    check_target(name)
    return int(TPU_TARGETS[name].hbm_gib * 2**30) if is_tpu(name) else TARGETS[name][3]


def require_tpu_extra(name: str) -> None:
    """A one-line error when libtpu (the `tpu-aot` extra) is not importable."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise UserError(f"--target {name} compiles with libtpu, which is not installed: "
                        'pip install -e ".[tpu-aot]"') from None


def tpu_slice_devices(name: str) -> list:
    """The devices of the whole TPU slice `name` (all its hosts), for compiling only: no TPU needed."""
    check_target(name)
    require_tpu_extra(name)
    spec = TPU_TARGETS[name]
    # Compiling touches no TPU, so other processes holding libtpu's single-user lock do not matter.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    from jax.experimental import topologies

    jax.devices()  # start this process's own (CPU) backend before libtpu loads: the other order crashes
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=spec.topology,
                                            chip_config_name=spec.chip_config, chips_per_host_bounds=spec.chips_per_host,
                                            num_slices=1, wrap=(False, False, False))
    except Exception as e:  # noqa: BLE001 - libtpu's errors are C++ status strings
        raise UserError(f"libtpu cannot describe {name} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): reinstall it with "
                        'pip install -e ".[tpu-aot]"') from None
    devices = list(topo.devices)
    if len(devices) != spec.chips:
        raise UserError(f"libtpu describes {name} with {len(devices)} devices, not {spec.chips}: "
                        'install the libtpu this project pins with pip install -e ".[tpu-aot]"')
    return devices


def target_config_proto(name: str) -> str:
    check_target(name)
    if is_tpu(name):
        raise UserError(f"--target {name} is a TPU slice, not a GPU")
    desc, (major, minor), sms, mem, bw, l2, smem, ghz = TARGETS[name]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {128 if major >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bw}
  l2_cache_size: {l2}
  clock_rate_ghz: {ghz}
  device_memory_size: {mem}
  shared_memory_per_block_optin: {smem - 1024}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{desc}"
"""


def target_devices(name: str, n_devices: int):
    """`n_devices` abstract GPUs of one host (topology 1x1xN) to build a mesh from and compile for."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies

    proto = target_config_proto(name)
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=proto, topology=f"1x1x{n_devices}")
    except Exception as e:  # the plugin is missing or cannot describe this target
        raise UserError(
            f"cannot build a {name} target ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
            "install JAX's CUDA plugin with `pip install -e .[cuda-aot]`") from None
    return list(topo.devices)

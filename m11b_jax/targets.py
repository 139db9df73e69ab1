"""Descriptions of GPUs we compile for ahead of time, without one present (`--target h100`).

JAX's CUDA plugin (`pip install -e .[cuda-aot]`; no driver or CUDA libraries needed) builds a device
topology from an XLA `GpuTargetConfigProto`; we fill one in from this small table. The figures are the
chips' public specifications (as in XLA's xla/backends/gpu/target_config/specs/*.txtpb).
"""

from __future__ import annotations

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
    "TPU v6": 918e12,
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


def target_config_proto(name: str) -> str:
    if name not in TARGETS:
        raise UserError(f"unknown --target {name!r}: choose one of {', '.join(sorted(TARGETS))}")
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

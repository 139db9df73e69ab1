"""The GPU benchmark scripts on a CPU: the HLO traffic analysis of bench_gpu_aot.py on a hand-written program,
and gpu_mfu_sweep.py's --dry-run (its logic at toy size: JSON lines, budget, skips)."""

import importlib.util
import json
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HLO = """HloModule m

%fused_add (p0: f32[1024,262144]) -> f32[1024,262144] {
  %p0 = f32[1024,262144]{1,0} parameter(0)
  ROOT %add.1 = f32[1024,262144]{1,0} add(%p0, %p0)
}

%body (arg: (s32[], f32[1024,262144])) -> (s32[], f32[1024,262144]) {
  %arg = (s32[], f32[1024,262144]{1,0}) parameter(0)
  %x = f32[1024,262144]{1,0} get-tuple-element(%arg), index=1
  %fusion.1 = f32[1024,262144]{1,0} fusion(%x), kind=kLoop, calls=%fused_add
  %gemm.1 = f32[1024,262144]{1,0} custom-call(%fusion.1, %x), custom_call_target="__cublas$gemm"
  %scores = bf16[2,4,64,64]{3,2,1,0} custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="flash_attention_fwd"}
  %probs = bf16[2,4,64,64]{3,2,1,0} custom-call(%x), custom_call_target="__cublas$gemm"
  %i = s32[] get-tuple-element(%arg), index=0
  ROOT %t = (s32[], f32[1024,262144]{1,0}) tuple(%i, %gemm.1)
}

%cond (arg: (s32[], f32[1024,262144])) -> pred[] {
  %arg = (s32[], f32[1024,262144]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[1024,262144]) -> f32[1024,262144] {
  %a = f32[1024,262144]{1,0} parameter(0)
  %i0 = s32[] constant(0)
  %tup = (s32[], f32[1024,262144]{1,0}) tuple(%i0, %a)
  %w = (s32[], f32[1024,262144]{1,0}) while(%tup), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %r = f32[1024,262144]{1,0} get-tuple-element(%w), index=1
  ROOT %out = f32[1024,262144]{1,0} fusion(%r), kind=kLoop, calls=%fused_add
}
"""


def test_traffic_analysis_counts_kernels_by_category_and_loop_trips():
    a = _load("bench_gpu_aot").analyze(HLO, seq_len=64)
    buf = 1024 * 262144 * 4  # 1.07 GB
    assert a["traffic_gb"]["other"] == round((3 * 2 * buf + 2 * buf) / 1e9, 2)  # the loop fusion x3 + the last
    assert a["traffic_gb"]["matmul"] == round(3 * 3 * buf / 1e9, 2)
    assert a["fused_attention_calls"] == 1 and a["attention_forwards"] == 1
    assert a["traffic_gb"]["attention"] == round(3 * (2 * 4 * 64 * 64 * 2 + buf) / 1e9, 2)
    assert a["traffic_gb"]["attention_unfused"] == a["traffic_gb"]["attention"]  # a GEMM writing [.., T, T]
    assert a["non_matmul_gb"] == round((3 * 2 * buf + 2 * buf + 6 * (2 * 4 * 64 * 64 * 2 + buf)) / 1e9, 2)
    assert a["btt_arrays"] == ["bf16[2,4,64,64]"]
    assert _load("bench_gpu_aot").shape_bytes("(f32[2,3]{1,0}, bf16[4])") == 24 + 8


def test_sweep_dry_run_prints_json_lines_within_its_budget(capsys):
    sweep = _load("gpu_mfu_sweep")
    sweep.main(["--dry-run", "--budget-s", "15", "--step-estimate-s", "6"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert rows[0]["part"] == "setup" and rows[0]["dry_run"] and rows[-1]["part"] == "done"
    assert {r["shape"] for r in rows if r.get("part") == "matmul"} == {"qkv/out", "fc1", "fc2", "logits"}
    assert {"skipped": "attention cudnn", "reason": "needs an NVIDIA GPU"} in rows
    for r in rows:
        assert "error" not in r, r
        if "skipped" in r:
            assert r["reason"]
        if r.get("part") == "step":  # no MFU on a CPU (unknown peak); the rest is measured
            assert r["mfu"] is None and r["tokens_per_s"] > 0 and r["compiled_gib"] > 0
    # Budget: a part starts only if its estimate fits (the last part may overrun its estimate)
    assert rows[-1]["elapsed_s"] < 15 + 60


@pytest.mark.parametrize("name", ["default", "all"])
def test_compiler_settings_are_named(name):
    from m11b_jax.errors import UserError
    from m11b_jax.targets import compiler_options

    assert isinstance(compiler_options(name), dict)
    with pytest.raises(UserError, match="unknown GPU compiler settings"):
        compiler_options("fast")

"""TPU slices as `--target`s: the table, the names a user may pass, and the errors when the slice cannot be
described. The deviceless TPU compile itself needs libtpu (the `tpu-aot` extra, not installed in CI): it runs
in benchmarks/bench_memory.py --targets."""

import json
import math
import re
import sys

import pytest

from m11b_jax import aot
from m11b_jax import targets as T
from m11b_jax.errors import UserError
from m11b_jax.train import main as train_main
from m11b_jax.train import parse_args

# Per generation: HBM per chip (GiB), dense bf16 peak per chip, whether a chip is one "megacore" of two
# TensorCores (then the slice name counts cores, two per chip).
GENERATIONS = {"v4": (32, 275e12, True), "v5e": (16, 197e12, False), "v5p": (95, 459e12, True),
               "v6e": (32, 918e12, False)}


@pytest.mark.parametrize("name", ["v4-8", "v4-16", "v5e-8", "v5e-16", "v5p-8", "v5p-16", "v6e-8"])
def test_tpu_table_entry_is_a_consistent_cloud_tpu_slice(name):
    spec = T.TPU_TARGETS[name]
    gen, count = name.split("-")
    hbm, peak, megacore = GENERATIONS[gen]
    grid = [int(x) for x in spec.topology.split(":")[1].split("x")]
    assert math.prod(grid) == spec.chips  # the topology describes exactly the slice's chips
    assert int(count) == spec.chips * (2 if megacore else 1)  # Cloud TPU's naming: cores (v4, v5p) or chips
    assert spec.chip_config == ("megacore" if megacore else "default")
    assert spec.hbm_gib == hbm and T.memory_bytes(name) == hbm * 2**30
    assert T.peak_flops(spec.device_kind) == peak  # MFU has a peak on every slice we compile for
    per_host = math.prod(spec.chips_per_host)
    assert spec.chips % per_host == 0 and all(h <= g for h, g in zip(spec.chips_per_host, grid + [1]))
    assert T.is_tpu(name) and not T.is_tpu("h100")


def test_device_kinds_map_to_their_own_peaks():
    """v5p chips report "TPU v5", which must not fall through to nothing, nor v5e's "TPU v5 lite" to v5p's peak."""
    assert T.peak_flops("TPU v5") == 459e12
    assert T.peak_flops("TPU v5 lite") == 197e12
    assert T.peak_flops("TPU v6 lite") == 918e12
    assert T.peak_flops("TPU v4") == 275e12
    assert T.TPU_TARGETS["v5e-16"].hosts == 4 and T.TPU_TARGETS["v5e-8"].hosts == 1


def test_unknown_target_lists_every_known_one():
    with pytest.raises(UserError) as e:
        parse_args(["--arch", "transformer_lm_megatron_11b", "--batch-size", "2", "--compile-only",
                    "--target", "v9-8"])
    msg = str(e.value)
    assert "\n" not in msg and "unknown --target 'v9-8'" in msg
    for name in ["h100", "a100", *T.TPU_TARGETS]:
        assert re.search(rf"\b{re.escape(name)}\b", msg), name


def test_missing_tpu_extra_is_a_one_line_error(monkeypatch, capsys):
    """Simulate an environment without libtpu: importing it fails, the CLI says which extra to install."""
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` now raises ImportError
    with pytest.raises(UserError, match=r'--target v5e-8 compiles with libtpu, which is not installed: '
                                        r'pip install -e "\.\[tpu-aot\]"'):
        T.tpu_slice_devices("v5e-8")
    with pytest.raises(SystemExit) as e:
        train_main(["--arch", "tiny", "--batch-size", "2", "--compile-only", "--target", "v5e-8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --target v5e-8 compiles with libtpu") and "tpu-aot" in err


def test_slice_size_is_the_slice_not_the_world_size_flag():
    """A TPU slice compiles whole: a --distributed-world-size that disagrees is an error, before libtpu loads."""
    with pytest.raises(UserError, match=r"--target v4-16 is a slice of 8 chips, not 16 devices: pass "
                                        r"--distributed-world-size 8 or omit it"):
        aot.target_mesh("v4-16", 16, 8)


def test_generate_and_eval_compile_only_name_the_missing_tpu_extra(monkeypatch, capsys):
    """`generate --compile-only --target SLICE` and eval_lm's share the compile-only mesh (aot.compile_only_mesh):
    without libtpu both stop with train's one-line error naming the extra."""
    from m11b_jax.eval_lm import main as eval_main
    from m11b_jax.generate import main as generate_main

    monkeypatch.setitem(sys.modules, "libtpu", None)
    for cli, size in ((generate_main, ["--cache-len", "64"]), (eval_main, ["--tokens-per-sample", "64",
                                                                            "--context-window", "32"])):
        with pytest.raises(SystemExit) as e:
            cli(["--compile-only", "--arch", "tiny", "--model-parallel-size", "8", "--target", "v5e-16", *size])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: --target v5e-16 compiles with libtpu") and "tpu-aot" in err
    with pytest.raises(SystemExit):
        generate_main(["--compile-only", "--arch", "tiny", "--cache-len", "64", "--target", "v9-8"])
    assert "unknown --target 'v9-8'" in capsys.readouterr().err


def test_generate_compile_only_compiles_the_whole_slice(monkeypatch, capsys):
    """The decode step is compiled for every chip of the slice (--batch-size rows per data-parallel replica),
    and the report reads the chip's HBM off the target table. The slice's chips are stood in for by this
    process's 8 CPU devices (libtpu's own compile runs in benchmarks, not in CI)."""
    import jax

    from m11b_jax.generate import main as generate_main

    described = []
    monkeypatch.setattr(T, "tpu_slice_devices", lambda name: described.append(name) or jax.devices()[:8])
    generate_main(["--compile-only", "--arch", "tiny", "--model-parallel-size", "4", "--dtype", "bfloat16",
                   "--batch-size", "3", "--cache-len", "32", "--target", "v5e-8"])
    report = json.loads(capsys.readouterr().out)
    assert described == ["v5e-8"]
    assert report["mesh"]["shape"] == {"data": 2, "model": 4} and report["batch_size"] == 6
    assert report["target"] == "v5e-8" and report["device_memory_gib"] == 16.0
    total = report["per_device_bytes"]["total"]
    assert 0 < total and report["headroom_fraction"] == round(1 - total / 16 / 2**30, 4)
    assert report["layer_body_collectives"] and report["cache_len"] == 32

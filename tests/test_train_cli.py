"""The training CLI: the seed's fairseq command, --compile-only, the offline default, and one clear error
for each kind of bad input."""

import ctypes
import json
import math
import sys

import flax.linen as nn
import jax
import pytest

from m11b_jax import runtime, sharding
from m11b_jax.config import load_config
from m11b_jax.errors import UserError
from m11b_jax.model import abstract_variables
from m11b_jax.train import parse_args, run
from train_fixtures import base_args, make_databin, run_cli, shared_databin

# fairseq's examples/megatron_11b/README.md training command, `fairseq-train` replaced, flags as written.
SEED_COMMAND = """--distributed-world-size 8 --memory-efficient-fp16 --num-workers 2 --model-parallel-size 8
  --criterion vocab_parallel_cross_entropy --task language_modeling --sample-break-mode none
  --tokens-per-sample 1024 --arch transformer_lm_megatron_11b --share-decoder-input-output-embed
  --optimizer adam --adam-betas (0.9,__0.98) --adam-eps 1e-08 --clip-norm 0.0
  --lr-scheduler inverse_sqrt --lr 0.00015 --warmup-updates 3000 --weight-decay 0.01
  --dropout 0.1 --attention-dropout 0.1 --max-sentences 2 --max-update 300000"""


def seed_argv(data_path: str) -> list[str]:
    return [data_path] + [tok.replace("__", " ") for tok in SEED_COMMAND.split()]


def test_seed_command_is_accepted_as_written():
    cfg = parse_args(seed_argv("wikitext103-bin"))
    a = cfg.args
    # --memory-efficient-fp16: fp16 parameters and compute, fp32 Adam, fairseq's loss scaler with its defaults.
    assert cfg.model.name == "transformer_lm_megatron_11b" and cfg.model.compute_dtype == "float16"
    assert cfg.model.param_dtype == "float16" and cfg.precision == "memory_efficient_fp16"
    assert "fp16 params" in cfg.dtype_policy and "fp32 Adam" in cfg.dtype_policy
    assert (cfg.loss_scale.init_scale, cfg.loss_scale.scale_window, cfg.loss_scale.min_scale) == (128.0, None, 1e-4)
    assert (cfg.batch_size, cfg.tokens_per_sample, cfg.model_parallel_size, cfg.world_size) == (2, 1024, 8, 8)
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.lr == 0.00015 and cfg.optim.eps == 1e-8
    assert (cfg.optim.warmup_updates, cfg.optim.weight_decay, cfg.optim.clip_norm) == (3000, 0.01, 0.0)
    assert a.criterion == "vocab_parallel_cross_entropy" and a.max_update == 300000 and a.num_workers == 2
    assert cfg.sequence_parallel  # default for model parallelism when it divides the block


def test_seed_command_compile_only_reports_the_full_model_fits():
    """The full 11B step compiled for 8 simulated CPU devices from the seed command: one JSON object on stdout."""
    proc = run_cli(seed_argv("no-data-needed") + ["--compile-only"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)  # exactly one JSON document, nothing else on stdout
    release = load_config("transformer_lm_megatron_11b")
    counted = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.unbox(abstract_variables(release))))
    assert report["params"] == counted == release.num_params()  # the model's own tree, 11_032_246_272
    assert report["mesh"]["shape"] == {"data": 1, "model": 8} and report["mesh"]["platform"] == "cpu"
    assert report["sequence_parallel"] is True and report["compute_dtype"] == "float16"
    assert report["param_dtype"] == "float16" and report["loss_scaling"] is True
    assert 10 * 2**30 < report["per_device_bytes"]["total"] <= 80 * 2**30 and report["fits"] is True
    assert report["tokens_per_step"] == 2 * 1024
    for kind in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"):
        assert set(report["collectives"][kind]) == {"count", "shapes"}


def test_compile_only_that_does_not_fit_fails_clearly(capsys):
    with pytest.raises(UserError, match=r"needs [\d.]+ GiB per device, more than --device-memory-gb 1e-06: raise "
                                        r"--model-parallel-size"):
        run(["--arch", "tiny", "--batch-size", "2", "--tokens-per-sample", "32", "--model-parallel-size", "2",
             "--compile-only", "--device-memory-gb", "0.000001"])
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is False and report["sequence_parallel"] is True


def test_offline_default_trains_and_reports_where_everything_went(tmp_path, capsys):
    """The no-argument run, shortened: tiny on the offline corpus, mesh (4, 2), ppl falls, checkpoint saved."""
    cfg = parse_args([])
    assert cfg.offline and cfg.model.name == "tiny" and cfg.model_parallel_size == 2 and cfg.data is None
    assert cfg.args.save_dir == "checkpoints/offline_tiny" and cfg.args.max_update > 100
    save, tb = tmp_path / "ckpt", tmp_path / "tb"
    # Shorter blocks and the other tests' optimizer settings: the same compiled programs, so a cache hit.
    small = ["--tokens-per-sample", "32", "--batch-size", "2", "--lr", "0.002", "--warmup-updates", "2",
             "--adam-betas", "(0.9, 0.999)", "--clip-norm", "0", "--weight-decay", "0.01", "--batch-size-valid", "2"]
    summary = run(small + ["--max-update", "8", "--log-interval", "4", "--save-dir", str(save),
                           "--tensorboard-logdir", str(tb), "--no-progress-bar"])
    assert summary.mesh == {"data": 4, "model": 2}
    assert [v["update"] for v in summary.valid] == [0, 8]
    assert summary.valid[-1]["valid_ppl"] < 0.5 * summary.valid[0]["valid_ppl"]
    assert summary.checkpoints == [8] and (save / "8" / "state").is_dir()
    records = [json.loads(x) for x in (save / "train_log.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "loss" in r]
    assert [r["update"] for r in train_lines] == [4, 8]
    for r in train_lines:
        assert {"update", "loss", "ppl", "lr", "gnorm", "wpb", "wps", "mfu", "elapsed_s"} <= set(r)
        assert r["mfu"] is None and r["wps"] > 0 and r["ppl"] == pytest.approx(2 ** r["loss"])
    assert {"valid_loss", "valid_ppl"} <= set(records[-1])
    from train_fixtures import tensorboard_tags

    assert {"train/loss", "train/ppl", "valid/loss", "valid/ppl"} <= tensorboard_tags(tb)  # issue 14, item 14
    out = capsys.readouterr().out
    assert "validation ppl: first" in out and f"checkpoints: {save}" in out and "train_log.jsonl" in out


def test_update_freq_2_through_the_cli_equals_one_double_batch(tmp_path):
    """--update-freq 2 --batch-size 1 takes the same 8 blocks per update as --batch-size 2 (the batcher's order is
    defined per global batch); without dropout the losses agree to float rounding."""
    data = shared_databin()
    nodrop = ("--dropout", "0", "--attention-dropout", "0", "--no-save", "--disable-validation")
    two = run(base_args(data, tmp_path / "a", *nodrop, "--update-freq", "2", batch=1, max_update=3))
    one = run(base_args(data, tmp_path / "b", *nodrop, batch=2, max_update=3))
    assert [r["wpb"] for r in two.train] == [r["wpb"] for r in one.train]
    for u in (1, 2, 3):
        assert abs(two.losses[u] - one.losses[u]) < 1e-5, u


def _tiny(data, save, *extra):
    return base_args(data, save, *extra)


@pytest.mark.parametrize("case, argv, message", [
    ("unknown flag", ["DATA", "--arch", "tiny", "--batch-size", "2", "--bucket-cap-mb", "--frobnicate"],
     r"^unsupported flags --bucket-cap-mb, --frobnicate: m11b_jax.train does not implement them"),
    ("unknown arch", ["DATA", "--arch", "transformer_lm_gpt3", "--batch-size", "2"],
     r"unknown arch 'transformer_lm_gpt3': use one of .*tiny"),
    ("untied megatron", ["DATA", "--arch", "transformer_lm_megatron_11b", "--batch-size", "2"],
     r"ties its input and output embeddings .*add --share-decoder-input-output-embed"),
    ("bad choice", ["DATA", "--arch", "tiny", "--batch-size", "2", "--lr-scheduler", "cosine"],
     r"argument --lr-scheduler: invalid choice: 'cosine'"),
    ("lr list", ["DATA", "--arch", "tiny", "--batch-size", "2", "--lr", "0.1,0.2"],
     r"--lr '0.1,0.2': per-epoch lists are not supported"),
    ("no batch", ["DATA", "--arch", "tiny"], r"--batch-size \(--max-sentences\) or --max-tokens is required"),
    ("no arch", ["DATA", "--batch-size", "2"], r"--arch is required with a DATA_PATH"),
    ("heads vs mp", ["DATA", "--arch", "tiny", "--batch-size", "2", "--model-parallel-size", "3"],
     r"num_heads=8 is not divisible by the model-parallel size 3"),
    ("fused loss vs mp", ["DATA", "--arch", "tiny", "--batch-size", "2", "--model-parallel-size", "2", "--loss-impl",
                          "fused"], r"loss_impl='fused' works without a model axis, not with --model-parallel-size 2"),
    ("transposed grads vs save_dots", ["DATA", "--arch", "tiny", "--batch-size", "2", "--weight-grad-impl",
                                       "transposed", "--remat-policy", "save_dots"],
     r"weight_grad_impl='transposed' hides the projections from remat policy 'save_dots'"),
    ("fp16 with bf16", ["DATA", "--arch", "tiny", "--batch-size", "2", "--fp16", "--bf16"],
     r"--fp16 and --bf16 ask for two precisions: give the fp16 flags or the bf16 flags, not both"),
    ("memory-efficient fp16 with bf16", ["DATA", "--arch", "tiny", "--batch-size", "2", "--memory-efficient-fp16",
                                         "--memory-efficient-bf16"], r"--memory-efficient-fp16 and "
     r"--memory-efficient-bf16 ask for two precisions"),
    ("bad scale window", ["DATA", "--arch", "tiny", "--batch-size", "2", "--fp16", "--fp16-scale-window", "0"],
     r"--fp16-scale-window 0 must be >= 1"),
])
def test_bad_command_lines_are_one_clear_error(case, argv, message, tmp_path):
    with pytest.raises(UserError, match=message) as e:
        run([str(tmp_path) if a == "DATA" else a for a in argv])
    assert "\n" not in str(e.value)


def test_bad_data_and_devices_are_one_clear_error(tmp_path):
    data = shared_databin()
    save = tmp_path / "save"
    with pytest.raises(UserError, match=r"DATA_PATH .*missing is not a directory: pass a fairseq data-bin"):
        run(_tiny(tmp_path / "missing", save))
    with pytest.raises(UserError, match=r"split 'test' not found in .* \(no test.bin/test.idx; it has: train, valid\)"):
        run(_tiny(data, save, "--valid-subset", "test"))
    big = make_databin(tmp_path / "big", n_symbols=1100, n_lines=20, valid_lines=5)
    with pytest.raises(UserError, match=r"has 1104 symbols .* the model's vocabulary is 1024: use an --arch with "
                                        r"vocab_size >= 1104"):
        run(_tiny(big, save))
    # A model-parallel size that fits the model (6 heads, ffn and vocab divisible by 6) but not the 8 devices.
    arch = tmp_path / "six.json"
    arch.write_text(json.dumps({"name": "six", "vocab_size": 1026, "d_model": 96, "ffn_dim": 384, "num_layers": 1,
                                "num_heads": 6, "max_positions": 64}))
    argv = _tiny(data, save, "--model-parallel-size", "6")  # the last value of a flag wins
    argv[argv.index("--arch") + 1] = str(arch)
    with pytest.raises(UserError, match=r"--model-parallel-size 6 does not divide the 8 available devices"):
        run(argv)


def test_retain_host_memory_applies_where_the_c_library_has_mallopt_and_can_be_opted_out(monkeypatch):
    """The CPU allocator setting the trainer applies (see runtime.retain_host_memory) takes effect exactly where
    this process's C library offers mallopt (glibc does, musl does not), and M11B_RETAIN_HOST_MEMORY=0 leaves the
    allocator alone."""
    try:
        has_mallopt = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallopt")
    except OSError:
        has_mallopt = False
    monkeypatch.setenv("M11B_RETAIN_HOST_MEMORY", "0")
    assert runtime.retain_host_memory() is False
    monkeypatch.delenv("M11B_RETAIN_HOST_MEMORY")
    assert runtime.retain_host_memory() is has_mallopt
    cpu_mesh = sharding.make_mesh(1, jax.devices()[:1])  # the test devices are CPUs
    assert runtime.retain_host_memory_on_cpu(cpu_mesh) is has_mallopt

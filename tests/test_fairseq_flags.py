"""fairseq's training flags: the arch registry and size flags, --max-tokens batching, --lr-scheduler fixed, the
logged lr, --log-format json, and the start-up line that states the global batch."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from m11b_jax import sharding as S
from m11b_jax.param_tree import init_params
from m11b_jax.errors import UserError
from m11b_jax.train import parse_args, run
from m11b_jax.train_data import fairseq_blocks_per_batch
from train_fixtures import make_databin, shared_databin

TINY_SIZES = ["--decoder-embed-dim", "128", "--decoder-ffn-embed-dim", "512", "--decoder-layers", "2",
              "--decoder-attention-heads", "8"]


@pytest.fixture(scope="module")
def databin_1024(tmp_path_factory):
    """A data-bin whose dictionary has 1024 symbols (tiny.json's vocabulary)."""
    return make_databin(tmp_path_factory.mktemp("d1024") / "data", n_symbols=1020, n_lines=40, valid_lines=4)


def test_fairseq_arch_with_size_flags_equals_the_json_config(databin_1024):
    flags = parse_args([str(databin_1024), "--arch", "transformer_lm_gpt", "--share-decoder-input-output-embed",
                        "--tokens-per-sample", "128", "--batch-size", "2", *TINY_SIZES])
    js = parse_args([str(databin_1024), "--arch", "tiny", "--tokens-per-sample", "128", "--batch-size", "2"])
    a, b = dataclasses.asdict(flags.model), dataclasses.asdict(js.model)
    assert a.pop("name") == "transformer_lm_gpt" and b.pop("name") == "tiny"
    assert a == b  # sizes, vocab (len(dict.txt)), positions, dropouts, init rule and policies
    mesh = S.make_mesh(1, jax.devices()[:1])
    pa = init_params(flags.model, mesh, S.logical_rules(), seed=3)
    pb = init_params(js.model, mesh, S.logical_rules(), seed=3)
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))


def test_registry_sizes_and_what_fairseq_decides():
    data = str(shared_databin())  # 204 symbols
    base = [data, "--share-decoder-input-output-embed", "--batch-size", "1"]
    for arch, sizes in {"transformer_lm_gpt": (768, 3072, 12, 12), "transformer_lm_gpt2_small": (1024, 4096, 24, 16),
                        "transformer_lm_gpt2_medium": (1280, 5120, 36, 20),
                        "transformer_lm_gpt2_big": (1600, 6400, 48, 25)}.items():
        m = parse_args(base + ["--arch", arch]).model
        assert (m.d_model, m.ffn_dim, m.num_layers, m.num_heads) == sizes, arch
        assert (m.vocab_size, m.max_positions, m.init, m.dropout, m.attention_dropout) == (204, 1024, "fairseq", 0.1, 0.1)
    m = parse_args(base + ["--arch", "transformer_lm", "--activation-fn", "gelu"]).model
    assert (m.d_model, m.ffn_dim, m.num_layers, m.num_heads, m.attention_dropout) == (512, 2048, 6, 8, 0.0)
    # the model-parallel arch: vocab padded to 8 x mp as fairseq pads its dictionary; Megatron's init
    m = parse_args(base + ["--arch", "transformer_lm_megatron", "--model-parallel-size", "2",
                           "--decoder-layers", "2"]).model
    assert (m.d_model, m.ffn_dim, m.num_layers, m.vocab_size, m.init) == (3072, 12288, 2, 208, "megatron")
    assert parse_args(base + ["--arch", "transformer_lm_megatron"]).model.init == "megatron_mp1"
    # size flags override a configs/ arch too
    m = parse_args(base + ["--arch", "tiny", "--decoder-layers", "3", "--decoder-attention-heads", "4"]).model
    assert (m.num_layers, m.num_heads, m.d_model) == (3, 4, 128)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "transformer_lm", "--share-decoder-input-output-embed"], r"uses relu activations in fairseq.*"
                                                                          r"--activation-fn gelu"),
    (["--arch", "transformer_lm_gpt"], r"without --share-decoder-input-output-embed .* always ties them"),
    (["--arch", "tiny", "--max-tokens", "16"], r"--max-tokens 16 is smaller than one block \(--tokens-per-sample 32\)"),
])
def test_refused_fairseq_flags_name_the_problem(argv, message):
    with pytest.raises(UserError, match=message):
        parse_args([str(shared_databin()), "--batch-size", "2", "--tokens-per-sample", "32", *argv])


def fairseq_batch_sizes(n_blocks, block_len, max_tokens, max_sentences, bsz_mult):
    """Independent transcription of fairseq 0.12's batch_by_size_vec on equal lengths: batch ends are recorded
    at every size < bsz_mult or multiple of it; an overflow closes the batch at the last recorded end."""
    sizes, start, last_end = [], 0, 0
    for pos in range(n_blocks):
        n = pos + 1 - start
        overflow = (max_sentences and n > max_sentences) or (max_tokens and n * block_len > max_tokens)
        if overflow:
            sizes.append(last_end - start)
            start = last_end
            n = pos + 1 - start
        if overflow or n < bsz_mult or n % bsz_mult == 0:
            last_end = pos + 1
    return sizes


@pytest.mark.parametrize("max_tokens, batch_size, expected", [
    (1024, None, 1), (4096, None, 4), (6144, None, 6), (8192, None, 8), (12288, None, 8), (16384, None, 16),
    (20480, None, 16), (5000, None, 4), (8192, 2, 2), (2048, 6, 2), (None, 12, 8)])
def test_max_tokens_gives_fairseqs_blocks_per_batch(max_tokens, batch_size, expected):
    got = fairseq_blocks_per_batch(max_tokens, 1024, batch_size, 8)
    assert got == expected
    assert set(fairseq_batch_sizes(200, 1024, max_tokens, batch_size, 8)[:-1]) == {expected}
    argv = [str(shared_databin()), "--arch", "tiny", "--tokens-per-sample", "128"]
    argv += ["--max-tokens", str(max_tokens // 8)] if max_tokens else []
    argv += ["--batch-size", str(batch_size)] if batch_size else []
    assert parse_args(argv).batch_size == expected  # the same rule at block length 128


def test_fixed_schedule_logged_lr_json_log_and_startup_line(tmp_path, capsys):
    """--lr-scheduler fixed with warmup 4: the update after n completed ones uses lr (n+1)/4; fairseq logs, after
    update u, the rate of update u + 1. --log-format json prints one JSON object per line. The start-up line
    states the global batch: --max-tokens 64 with 32-token blocks = 2 blocks per replica x 4 replicas."""
    summary = run([str(shared_databin()), "--arch", "tiny", "--tokens-per-sample", "32", "--max-tokens", "64",
                   "--model-parallel-size", "2", "--lr-scheduler", "fixed", "--lr", "0.002", "--warmup-updates", "4",
                   "--max-update", "3", "--log-interval", "1", "--log-format", "json", "--no-save",
                   "--disable-validation", "--save-dir", str(tmp_path)])
    assert [r["lr"] for r in summary.train] == pytest.approx([0.002 * 2 / 4, 0.002 * 3 / 4, 0.002])
    err = capsys.readouterr().err
    logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [r["update"] for r in logged if r["phase"] == "train"] == [1, 2, 3]
    assert "per device: 2 blocks x 32 tokens = 64 tokens per micro-batch (from --max-tokens 64)" in err
    assert "global: 2 x 4 data replicas x update-freq 1 = 8 blocks = 256 tokens per update" in err
    assert "| 8 cpu device(s), mesh data 4 x model 2" in err


def test_fixed_schedule_values():
    from m11b_jax.optim import fixed_schedule, inverse_sqrt_schedule

    f = fixed_schedule(0.5, 4)
    assert [float(f(n)) for n in range(6)] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    assert [float(fixed_schedule(0.5, 0)(n)) for n in range(3)] == [0.5] * 3
    assert float(inverse_sqrt_schedule(1.0, 4)(0)) == 0.0  # unchanged: inverse_sqrt's first update uses 0

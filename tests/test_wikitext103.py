"""`python -m m11b_jax.wikitext103` end to end on ../shared/data with a tiny random converted model.

The model comes from a synthetic fairseq release-layout checkpoint (8 fp16 shards written with torch,
tests/fairseq_fixtures.py) with GPT-2's dictionary, converted by `m11b_jax.convert`. Its final LayerNorm has
scale and bias 0, so every logit is 0 and every token has probability exactly 1/V: the perplexity must be the
vocabulary size V, whatever the text, which checks the pipeline's figures against a number known in advance.
A small window (128 / 64) keeps the 270847-token evaluation short on a CPU.
"""

from __future__ import annotations

import math
import re
import shutil

import numpy as np
import pytest

import fairseq_fixtures as ff
from m11b_jax import eval_lm, wikitext103
from m11b_jax.convert import convert_fairseq
from m11b_jax.indexed_dataset import MMapIndexedDataset

D, FFN, LAYERS, HEADS, MP = 16, 32, 2, 8, 8


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("wt103")
    gpt2_dict = shared_data / "gpt2_bpe" / "dict.txt"
    lines = sum(1 for _ in open(gpt2_dict, encoding="utf-8"))
    vocab = -(-(4 + lines) // (8 * MP)) * 8 * MP  # fairseq pads a model-parallel dictionary to 8 x mp
    merged = ff.merged_state(vocab=vocab, d=D, ffn=FFN, layers=LAYERS, seed=7)
    merged["decoder.layer_norm.weight"][:] = 0  # logits all 0: a uniform distribution over the vocabulary
    merged["decoder.layer_norm.bias"][:] = 0
    args = ff.fairseq_args(D, FFN, LAYERS, HEADS, MP)
    args.max_target_positions = args.tokens_per_sample = 1024
    release = ff.write_release(root / "release", merged, d=D, ffn=FFN, layers=LAYERS, heads=HEADS, mp=MP,
                               dict_lines=lines, args=args)
    shutil.copyfile(gpt2_dict, release / "dict.txt")  # the release ships GPT-2's dictionary
    convert_fairseq(release, root / "ckpt", log=lambda msg: None)
    return root / "ckpt", vocab


def test_wikitext103_end_to_end(converted, shared_data, tmp_path, capsys):
    ckpt, vocab = converted
    work = tmp_path / "work"
    wikitext103.main(["--path", str(ckpt), "--data-dir", str(shared_data / "wikitext-103"),
                      "--bpe-dir", str(shared_data / "gpt2_bpe"), "--work-dir", str(work),
                      "--tokens-per-sample", "128", "--context-window", "64", "--batch-size", "64"])
    out = capsys.readouterr().out
    row = re.search(r"^\| ([\d.]+) \| ([\d.]+) \| (\d+) / (\d+) \|$", out, re.M)
    assert row, out
    ppl, normalized, ntokens, orig = float(row[1]), float(row[2]), int(row[3]), int(row[4])
    assert (ntokens, orig) == (270847, 245566)
    assert MMapIndexedDataset(work / "data-bin" / "test").num_tokens == 270847
    # Uniform over V symbols: ppl = V exactly; normalized = V ** (270847 / 245566) (REFERENCE.md's rule).
    assert ppl == pytest.approx(vocab, rel=1e-5)
    assert normalized == pytest.approx(vocab ** (270847 / 245566), rel=1e-5)


def test_missing_inputs_name_the_files(converted, tmp_path, capsys):
    with pytest.raises(SystemExit):
        wikitext103.main(["--path", str(converted[0]), "--data-dir", str(tmp_path), "--bpe-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "wiki.test.raw" in err and "encoder.json" in err and "--download" in err


def test_download_without_network_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """Nothing listens on port 9 of localhost: the same path as having no network."""
    monkeypatch.setattr(wikitext103, "WIKITEXT_RAW_ZIP", "http://127.0.0.1:9/wikitext-103-raw-v1.zip")
    with pytest.raises(SystemExit) as e:
        wikitext103.main(["--path", str(tmp_path), "--data-dir", str(tmp_path / "d"), "--bpe-dir",
                          str(tmp_path / "b"), "--download"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the "downloading URL" progress line
    assert e.value.code == 2 and err.startswith("error: cannot download http://127.0.0.1:9/")
    assert not [p for p in (tmp_path / "d").iterdir()]  # no partial file left behind


def test_normalization_table_format():
    """REFERENCE.md's figures: ppl 8.46 over 270847 tokens is 10.54 normalized to 245566 original tokens."""
    summary = eval_lm.EvalResult(np.full(270847, -math.log(8.46), np.float32), elapsed_s=1.0).summary(245566)
    assert wikitext103.table(summary, "x").splitlines()[-1] == "| 8.46 | 10.54 | 270847 / 245566 |"

"""The Megatron-11b WikiText-103 test pipeline through the real CLIs: detok -> BPE -> binarize.

Known figures (fairseq's Megatron-11b README): 267956 BPE tokens on 2891 non-empty lines, so
270847 tokens with one </s> per line; the "original" word count of wiki.test.tokens is 245566.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from m11b_jax.detok import original_token_count
from m11b_jax.dictionary import Dictionary
from m11b_jax.indexed_dataset import MMapIndexedDataset

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_cli(module: str, *args, stdout=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", f"m11b_jax.{module}", *map(str, args)],
        env=env,
        check=True,
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=stdout is None,
    )


@pytest.fixture(scope="module")
def pipeline(shared_data, tmp_path_factory):
    """Runs the three CLIs once; returns the folder with every intermediate file."""
    work = tmp_path_factory.mktemp("wikitext")
    raw = shared_data / "wikitext-103" / "wiki.test.raw"
    bpe_dir = shared_data / "gpt2_bpe"
    with open(work / "wiki.test.detok", "wb") as out:
        run_cli("detok", raw, stdout=out)
    run_cli(
        "bpe",
        "--encoder-json",
        bpe_dir / "encoder.json",
        "--vocab-bpe",
        bpe_dir / "vocab.bpe",
        "--inputs",
        work / "wiki.test.detok",
        "--outputs",
        work / "wiki.test.bpe",
        "--workers",
        2,
    )
    logs = {}
    for name, workers in (("dict.txt", 1), ("dict.51200.txt", 2)):
        dest = work / f"bin-{name}"
        logs[name] = run_cli(
            "preprocess",
            "--only-source",
            "--testpref",
            work / "wiki.test.bpe",
            "--srcdict",
            bpe_dir / name,
            "--destdir",
            dest,
            "--workers",
            workers,
        ).stdout
    return work, logs


def test_detok_keeps_every_line(pipeline, shared_data):
    work, _ = pipeline
    raw_lines = (shared_data / "wikitext-103" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")
    detok_lines = (work / "wiki.test.detok").read_text(encoding="utf-8").split("\n")
    assert len(detok_lines) == len(raw_lines) == 4359  # 4358 lines + the empty string after the last \n
    assert " @-@ " not in (work / "wiki.test.detok").read_text(encoding="utf-8")


def test_bpe_counts(pipeline):
    work, _ = pipeline
    lines = (work / "wiki.test.bpe").read_text().splitlines()
    assert len(lines) == 2891
    assert sum(len(line.split()) for line in lines) == 267956


@pytest.mark.parametrize("dict_name", ["dict.txt", "dict.51200.txt"])
def test_binarized_token_count(pipeline, shared_data, dict_name):
    work, logs = pipeline
    dest = work / f"bin-{dict_name}"
    ds = MMapIndexedDataset(dest / "test")
    assert ds.dtype == np.uint16
    assert len(ds) == 2891
    assert ds.num_tokens == 270847
    tokens = np.asarray(ds.tokens())
    assert int((tokens == 2).sum()) == 2891 and int((tokens == 3).sum()) == 0  # one </s> per line, no <unk>
    assert "2891 sents, 270847 tokens" in logs[dict_name]
    assert (dest / "dict.txt").read_bytes() == (shared_data / "gpt2_bpe" / dict_name).read_bytes()
    # The indices decode back to the BPE text, line by line.
    d = Dictionary.load(dest / "dict.txt")
    bpe_lines = (work / "wiki.test.bpe").read_text().splitlines()
    for i in (0, 1, 1500, 2890):
        assert " ".join(d[int(t)] for t in ds[i][:-1]) == bpe_lines[i]


def test_both_dictionaries_give_the_same_files(pipeline):
    work, _ = pipeline
    for suffix in (".bin", ".idx"):
        a = (work / "bin-dict.txt" / f"test{suffix}").read_bytes()
        b = (work / "bin-dict.51200.txt" / f"test{suffix}").read_bytes()
        assert a == b


def test_original_token_count(shared_data):
    assert original_token_count(shared_data / "wikitext-103" / "wiki.test.tokens") == 245566

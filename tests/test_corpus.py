"""The offline default corpus: built from the stdlib, cached, atomic, deterministic, fits vocab 1024."""

import json
import os
import pathlib
import sysconfig

import numpy as np
import pytest
import sentencepiece as spm

from m11b_jax import corpus
from m11b_jax.blocks import TokenBlocks
from m11b_jax.dictionary import Dictionary
from m11b_jax.indexed_dataset import MMapIndexedDataset


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, corpus.ensure_offline_corpus(cache)


def test_first_build_is_complete(built):
    cache, path = built
    assert path.parent == cache and path.name.startswith("py3.")
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["dict.txt", "manifest.json", "spm.model", "train.bin", "train.idx", "valid.bin", "valid.idx"]
    )
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary folder left


def test_cached_call_builds_nothing(built, monkeypatch):
    cache, path = built
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def no_rebuild(files, root, out):
        raise AssertionError("a cached corpus was rebuilt")

    monkeypatch.setattr(corpus, "_build", no_rebuild)
    assert corpus.ensure_offline_corpus(cache) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before
    assert [p.name for p in cache.iterdir()] == [path.name]


def test_vocabulary_fits_tiny_model(built):
    _, path = built
    d = Dictionary.load(path / "dict.txt")
    assert len(d) == corpus.VOCAB_SIZE == 1024
    sp = spm.SentencePieceProcessor(model_file=str(path / "spm.model"))
    assert sp.get_piece_size() == 1024
    assert [sp.id_to_piece(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert all(d[i] == sp.id_to_piece(i) for i in range(4, 1024))
    for split in ("train", "valid"):
        ds = MMapIndexedDataset(path / split)
        tokens = np.asarray(ds.tokens())
        assert ds.dtype == np.uint16 and tokens.max() < 1024
        assert int((tokens == 2).sum()) == len(ds)  # one </s> per line
        assert not np.isin(tokens, [0, 1]).any()


def test_split_and_text(built):
    _, path = built
    manifest = json.loads((path / "manifest.json").read_text())
    files = corpus.stdlib_files()
    root = pathlib.Path(sysconfig.get_path("stdlib"))
    assert manifest["files"] == [p.relative_to(root).as_posix() for p in files]
    assert manifest["splits"]["train"]["tokens"] > 1_000_000
    assert manifest["splits"]["valid"]["tokens"] > 20_000
    # The first train sequence decodes to the first non-empty line of the first file.
    sp = spm.SentencePieceProcessor(model_file=str(path / "spm.model"))

    def first_line(p):
        return next(line.expandtabs(4).rstrip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())

    assert sp.decode(MMapIndexedDataset(path / "train")[0][:-1].tolist()) == first_line(files[0])
    # Valid holds the lines of files 19, 39, ...
    assert sp.decode(MMapIndexedDataset(path / "valid")[0][:-1].tolist()) == first_line(files[19])


def test_usable_as_blocks(built):
    _, path = built
    blocks = TokenBlocks.from_dataset(MMapIndexedDataset(path / "train"), 1024)
    assert len(blocks) > 1000


def test_rebuild_is_identical(built, tmp_path):
    _, path = built
    again = corpus.ensure_offline_corpus(tmp_path)
    for name in ("train.bin", "train.idx", "valid.bin", "dict.txt", "spm.model"):
        assert (again / name).read_bytes() == (path / name).read_bytes(), name


def test_killed_build_leaves_nothing(tmp_path, monkeypatch):
    stale = tmp_path / ".py3.x-old.tmp-abc123"
    stale.mkdir()
    os.utime(stale, (0, 0))  # a build that died long ago

    def dies(files, root, out):
        (out / "train.bin").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus, "_build", dies)
    with pytest.raises(KeyboardInterrupt):
        corpus.ensure_offline_corpus(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("M11B_CACHE_DIR", str(tmp_path))
    assert corpus.default_cache_dir() == tmp_path / "offline_corpus"
    monkeypatch.delenv("M11B_CACHE_DIR")
    assert corpus.default_cache_dir().parts[-3:] == (".cache", "m11b_jax", "offline_corpus")

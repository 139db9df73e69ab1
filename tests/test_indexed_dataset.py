"""fairseq mmap .bin/.idx: exact bytes, round trips for uint16 and int32, and damaged files."""

import struct

import numpy as np
import pytest

from m11b_jax.errors import UserError
from m11b_jax.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder, dtype_for_vocab, write_dataset


def fairseq_idx_bytes(dtype_code: int, itemsize: int, sizes: list) -> bytes:
    """The .idx layout as fairseq's MMapIndexedDataset.Index writer produces it, spelled out."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code) + struct.pack("<Q", len(sizes))
    out += b"".join(struct.pack("<i", s) for s in sizes)
    offset = 0
    for s in sizes:
        out += struct.pack("<q", offset)
        offset += s * itemsize
    return out


def test_dtype_for_vocab():
    assert dtype_for_vocab(1024) == np.uint16
    assert dtype_for_vocab(51200) == np.uint16
    assert dtype_for_vocab(65499) == np.uint16
    assert dtype_for_vocab(65500) == np.int32
    assert dtype_for_vocab(250_000) == np.int32


@pytest.mark.parametrize("dtype, code, fmt", [(np.uint16, 8, "<H"), (np.int32, 4, "<i")])
def test_exact_bytes(tmp_path, dtype, code, fmt):
    seqs = [[5, 6, 2], [2], [], [70, 1000, 9, 2]]
    write_dataset(tmp_path / "d", seqs, dtype)
    itemsize = struct.calcsize(fmt)
    assert (tmp_path / "d.idx").read_bytes() == fairseq_idx_bytes(code, itemsize, [len(s) for s in seqs])
    assert (tmp_path / "d.bin").read_bytes() == b"".join(struct.pack(fmt, t) for s in seqs for t in s)


@pytest.mark.parametrize("vocab", [1024, 51200, 70_000])
def test_round_trip(tmp_path, vocab):
    rng = np.random.default_rng(vocab)
    seqs = [rng.integers(0, vocab, size=rng.integers(0, 50)) for _ in range(200)]
    with MMapIndexedDatasetBuilder(tmp_path / "train", dtype_for_vocab(vocab), vocab_size=vocab) as out:
        for s in seqs[:100]:
            out.add_item(s)
        out.add_items(np.concatenate(seqs[100:]), [len(s) for s in seqs[100:]])
    ds = MMapIndexedDataset(tmp_path / "train")
    assert ds.dtype == dtype_for_vocab(vocab)
    assert len(ds) == 200
    assert ds.sizes.tolist() == [len(s) for s in seqs]
    assert ds.num_tokens == sum(len(s) for s in seqs)
    for i in (0, 1, 57, 199, -1):
        assert ds[i].tolist() == seqs[i].tolist()
    assert np.array_equal(ds.tokens(), np.concatenate(seqs))
    assert isinstance(ds.tokens(), np.memmap)  # mapped, not read into memory
    assert MMapIndexedDataset(str(tmp_path / "train.bin")).num_tokens == ds.num_tokens  # suffix accepted
    with pytest.raises(IndexError):
        ds[200]


def test_empty_dataset_is_readable(tmp_path):
    write_dataset(tmp_path / "e", [], np.uint16)
    ds = MMapIndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.tokens().size == 0


# ---- bad input ------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path):
    write_dataset(tmp_path / "s", [[4, 5, 2], [6, 2]], np.uint16)
    return tmp_path / "s"


def _error(prefix, match):
    with pytest.raises(UserError, match=match) as e:
        MMapIndexedDataset(prefix)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bin_size_mismatch(small):
    bin_path = small.with_suffix(".bin")
    bin_path.write_bytes(bin_path.read_bytes() + b"\x00\x00")
    msg = _error(small, "do not belong together")
    assert "s.bin" in msg and "s.idx" in msg
    bin_path.write_bytes(bin_path.read_bytes()[:4])
    _error(small, "do not belong together")


def test_wrong_magic(small):
    idx = small.with_suffix(".idx")
    idx.write_bytes(b"TNTIDX\x00\x00" + idx.read_bytes()[8:])
    _error(small, "not a fairseq mmap index")


def test_wrong_version(small):
    idx = small.with_suffix(".idx")
    data = bytearray(idx.read_bytes())
    data[9:17] = struct.pack("<Q", 2)
    idx.write_bytes(bytes(data))
    _error(small, "version 2")


@pytest.mark.parametrize("code", [0, 6, 11])
def test_bad_dtype_code(small, code):
    idx = small.with_suffix(".idx")
    data = bytearray(idx.read_bytes())
    data[17] = code
    idx.write_bytes(bytes(data))
    _error(small, f"dtype code {code}")


def test_truncated_index(small):
    idx = small.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:-3])
    _error(small, "index is damaged")
    idx.write_bytes(idx.read_bytes()[:20])
    _error(small, "truncated")


def test_inconsistent_offsets(small):
    idx = small.with_suffix(".idx")
    data = bytearray(idx.read_bytes())
    data[-8:] = struct.pack("<q", 4)  # second sequence should start at byte 6
    idx.write_bytes(bytes(data))
    _error(small, "offsets do not follow")


def test_missing_files(small):
    small.with_suffix(".bin").unlink()
    _error(small, "dataset file not found: .*s.bin")


def test_dictionary_does_not_fit_dtype(tmp_path):
    with pytest.raises(UserError, match="70000 symbols does not fit uint16"):
        MMapIndexedDatasetBuilder(tmp_path / "x", np.uint16, vocab_size=70_000)
    with pytest.raises(UserError, match="token index 65536 does not fit uint16"):
        with MMapIndexedDatasetBuilder(tmp_path / "x", np.uint16) as out:
            out.add_item([1, 65536])
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with MMapIndexedDatasetBuilder(tmp_path / "x", np.int32) as out:
            out.add_item([1, 2, 3])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []

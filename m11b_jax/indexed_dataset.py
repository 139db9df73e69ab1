"""fairseq's memory-mapped indexed dataset (`PREFIX.bin` + `PREFIX.idx`): writer and reader.

`.bin` holds every sequence's token indices back to back, little-endian, in one dtype.
`.idx` (all little-endian):

    offset 0   9 bytes  magic b"MMIDIDX\\x00\\x00"
           9   <Q       version, 1
          17   <B       dtype code (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f64, 8 u16, 9 u32, 10 u64)
          18   <Q       N, the number of sequences
          26   int32[N] sizes, in tokens
               int64[N] byte offset of each sequence in .bin

`fairseq-preprocess` (the release's version) stores uint16 when the dictionary has fewer than
65500 symbols, else int32; `dtype_for_vocab` makes the same choice, so the files written here are
byte-identical to fairseq's for the same input and dictionary (checked against fairseq 0.12.2's
own binarizer by benchmarks/check_fairseq_parity.py). fairseq >= 0.12 stores uint32 instead of
int32 for big vocabularies: the .bin bytes are the same, the .idx differs in the dtype code, and
the reader accepts both.

The reader maps both files (np.memmap) and never reads `.bin` whole; it checks the magic, the
version, the dtype, that the offsets follow from the sizes, and that `.bin` has exactly the
bytes `.idx` describes. The writer writes temporary files renamed into place by `finalize`.
"""

from __future__ import annotations

import os
import pathlib
import struct

import numpy as np

from . import fsutil
from .errors import UserError
from .textio import open_temp_file, check_output_file, default_file_mode

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8
DTYPE_CODES = {
    1: np.dtype("u1"),
    2: np.dtype("i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f8"),
    8: np.dtype("<u2"),
    9: np.dtype("<u4"),
    10: np.dtype("<u8"),
}
_WRITE_CODES = {
    np.dtype("u1"): 1,
    np.dtype("i1"): 2,
    np.dtype("<i2"): 3,
    np.dtype("<i4"): 4,
    np.dtype("<i8"): 5,
    np.dtype("<u2"): 8,
    np.dtype("<u4"): 9,
    np.dtype("<u8"): 10,
}
_CHECK_CHUNK = 1 << 20  # sequences per step when validating offsets (bounds memory on huge indexes)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """fairseq-preprocess's choice: uint16 below 65500 symbols, else int32."""
    return np.dtype("<u2") if vocab_size < 65500 else np.dtype("<i4")


def _strip_suffix(prefix: str | os.PathLike) -> str:
    prefix = os.fspath(prefix)
    return prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix


class MMapIndexedDatasetBuilder:
    """Write `PREFIX.bin`/`.idx`. Use as a context manager: an exception leaves no file behind.

    with MMapIndexedDatasetBuilder(prefix, dtype_for_vocab(len(dictionary))) as out:
        out.add_item(ids)          # or out.add_items(flat_ids, sizes)
    # finalized on a clean exit
    """

    def __init__(self, prefix: str | os.PathLike, dtype, vocab_size: int | None = None):
        self.prefix = _strip_suffix(prefix)
        self.dtype = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
        if self.dtype not in _WRITE_CODES:
            raise UserError(f"cannot store token indices as {np.dtype(dtype)}: use uint16 or int32")
        self._max = np.iinfo(self.dtype).max
        if vocab_size is not None and vocab_size - 1 > self._max:
            raise UserError(
                f"a dictionary of {vocab_size} symbols does not fit {self.dtype.name} (largest index {self._max}): "
                f"store int32 instead (dtype_for_vocab({vocab_size}) = {dtype_for_vocab(vocab_size).name})"
            )
        for suffix in (".bin", ".idx"):
            check_output_file(self.prefix + suffix)
            fsutil.remove_stale_temporaries(self.prefix + suffix)
        fd, self._tmp_bin = open_temp_file(fsutil.resolve(self.prefix + ".bin"), default_file_mode())
        self._bin = os.fdopen(fd, "wb")
        self._sizes: list[np.ndarray] = []
        self._done = False

    def add_item(self, ids) -> None:
        """Append one sequence of token indices."""
        ids = np.asarray(ids)
        self.add_items(ids.reshape(-1), np.array([ids.size], dtype=np.int64))

    def add_items(self, flat_ids, sizes) -> None:
        """Append len(sizes) sequences given as one flat array (faster than add_item per line)."""
        flat_ids = np.asarray(flat_ids)
        sizes = np.asarray(sizes, dtype=np.int64)
        if int(sizes.sum()) != flat_ids.size or (sizes < 0).any():
            raise ValueError(f"sizes sum to {int(sizes.sum())} but {flat_ids.size} ids were given")
        if flat_ids.size and (flat_ids.min() < 0 or flat_ids.max() > self._max):
            bad = flat_ids.max() if flat_ids.max() > self._max else flat_ids.min()
            raise UserError(
                f"token index {int(bad)} does not fit {self.dtype.name} (0..{self._max}): the dictionary does not "
                "fit the dataset dtype; write with dtype_for_vocab(len(dictionary))"
            )
        self._bin.write(flat_ids.astype(self.dtype, copy=False).tobytes())
        self._sizes.append(sizes)

    def finalize(self) -> None:
        """Write `.idx` and move both files into place."""
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int64)
        if sizes.size and sizes.max() > np.iinfo(np.int32).max:
            raise UserError(f"a sequence of {int(sizes.max())} tokens is too long for the .idx format (int32 sizes)")
        offsets = np.zeros(sizes.size, dtype="<i8")
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=offsets[1:])
        self._bin.close()
        fd, tmp_idx = open_temp_file(fsutil.resolve(self.prefix + ".idx"), default_file_mode())
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", _WRITE_CODES[self.dtype]))
                f.write(struct.pack("<Q", sizes.size))
                f.write(sizes.astype("<i4").tobytes())
                f.write(offsets.tobytes())
            os.replace(self._tmp_bin, self.prefix + ".bin")
            os.replace(tmp_idx, self.prefix + ".idx")
        finally:
            fsutil.remove_path(tmp_idx)
        fsutil.unregister(self._tmp_bin)
        self._done = True

    def abort(self) -> None:
        """Drop everything written so far."""
        self._bin.close()
        fsutil.remove_path(self._tmp_bin)
        self._done = True

    def __enter__(self) -> "MMapIndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.finalize()
            except BaseException:
                self.abort()
                raise
        elif not self._done:
            self.abort()


def write_dataset(prefix: str | os.PathLike, sequences, dtype) -> None:
    """Write a list of token-index sequences as `PREFIX.bin`/`.idx`."""
    with MMapIndexedDatasetBuilder(prefix, dtype) as out:
        for seq in sequences:
            out.add_item(seq)


class MMapIndexedDataset:
    """Read-only, memory-mapped view of a fairseq `PREFIX.bin`/`.idx` pair.

    `ds[i]` is sequence i as a read-only array in the stored dtype (a view of the mapped file);
    `tokens()` is the whole token stream, the sequences back to back.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = _strip_suffix(prefix)
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise UserError(
                    f"dataset file not found: {path} (binarize the text with python -m m11b_jax.preprocess)"
                )
        idx_bytes = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if header[: len(MAGIC)] != MAGIC:
            raise UserError(
                f"{idx_path} is not a fairseq mmap index (magic {header[: len(MAGIC)]!r}, expected {MAGIC!r}): "
                "re-binarize with --dataset-impl mmap (python -m m11b_jax.preprocess)"
            )
        if len(header) < HEADER_BYTES:
            raise UserError(f"{idx_path} is truncated ({idx_bytes} bytes, header needs {HEADER_BYTES}): re-binarize")
        (version,) = struct.unpack_from("<Q", header, len(MAGIC))
        if version != VERSION:
            raise UserError(f"{idx_path} has index version {version}; only version {VERSION} is known: re-binarize")
        (code,) = struct.unpack_from("<B", header, len(MAGIC) + 8)
        if code not in DTYPE_CODES or DTYPE_CODES[code].kind == "f":
            raise UserError(f"{idx_path} has dtype code {code}, not an integer token type: re-binarize")
        self.dtype = DTYPE_CODES[code]
        (n,) = struct.unpack_from("<Q", header, len(MAGIC) + 9)
        if idx_bytes != HEADER_BYTES + 12 * n:
            raise UserError(
                f"{idx_path} is {idx_bytes} bytes but {n} sequences need {HEADER_BYTES + 12 * n}: the index is "
                "damaged; re-binarize"
            )
        self._len = n
        if n:
            self.sizes = np.memmap(idx_path, dtype="<i4", mode="r", offset=HEADER_BYTES, shape=(n,))
            self._offsets = np.memmap(idx_path, dtype="<i8", mode="r", offset=HEADER_BYTES + 4 * n, shape=(n,))
        else:
            self.sizes = np.zeros(0, dtype="<i4")
            self._offsets = np.zeros(0, dtype="<i8")
        self.num_tokens = self._check_offsets(idx_path)
        bin_bytes = os.path.getsize(bin_path)
        if bin_bytes != self.num_tokens * self.dtype.itemsize:
            raise UserError(
                f"{bin_path} is {bin_bytes} bytes but {idx_path} describes {self.num_tokens} {self.dtype.name} "
                f"tokens ({self.num_tokens * self.dtype.itemsize} bytes): the .bin and .idx do not belong together; "
                "re-binarize"
            )
        self._tokens = (
            np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
            if self.num_tokens
            else np.zeros(0, dtype=self.dtype)
        )

    def _check_offsets(self, idx_path: str) -> int:
        """Check that offsets are the running byte sums of sizes; returns the total token count."""
        total = 0
        for start in range(0, self._len, _CHECK_CHUNK):
            sizes = np.asarray(self.sizes[start : start + _CHECK_CHUNK], dtype=np.int64)
            if (sizes < 0).any():
                raise UserError(f"{idx_path} holds a negative sequence size: the index is damaged; re-binarize")
            expected = (total + np.concatenate([[0], np.cumsum(sizes[:-1])])) * self.dtype.itemsize
            if not np.array_equal(expected, self._offsets[start : start + _CHECK_CHUNK]):
                raise UserError(f"{idx_path} offsets do not follow from its sizes: the index is damaged; re-binarize")
            total += int(sizes.sum())
        return total

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self._len <= i < self._len:
            raise IndexError(f"sequence {i} out of range for a dataset of {self._len}")
        i %= self._len
        start = int(self._offsets[i]) // self.dtype.itemsize
        return self._tokens[start : start + int(self.sizes[i])]

    def tokens(self) -> np.ndarray:
        """All tokens as one 1-D memory-mapped array (nothing is read until it is indexed)."""
        return self._tokens


def split_prefix(data_dir: str | os.PathLike, split: str, fix: str) -> pathlib.Path:
    """`DATA_DIR/SPLIT`, the prefix of a binarized split; a missing split is a one-line error that lists the
    splits the folder does hold and ends with `fix`."""
    data_dir = pathlib.Path(data_dir)
    prefix = data_dir / split
    if not (data_dir / f"{split}.idx").is_file() or not (data_dir / f"{split}.bin").is_file():
        have = sorted(p.stem for p in data_dir.glob("*.idx") if p.with_suffix(".bin").is_file())
        raise UserError(f"split {split!r} not found in {data_dir} (no {split}.bin/{split}.idx; it has: "
                        f"{', '.join(have) or 'no splits'}): {fix}")
    return prefix

"""Training and validation data from a fairseq data-bin, split across hosts, as global sharded batches.

A data-bin (`fairseq-preprocess --only-source`) holds `dict.txt` and one `SPLIT.bin`/`SPLIT.idx` pair per
split. The stream of a split is cut into `--tokens-per-sample` blocks (`--sample-break-mode none`).

Every update consumes `update_freq` global batches of `batch_size x data-axis-size` blocks. The global batch
is defined independently of the number of hosts (`blocks.BlockBatcher`); each process reads only the rows
that its own devices hold (its contiguous share of the `data` mesh axis) and the rows are assembled into one
global `jax.Array` [update_freq, global_batch, T], sharded over `data`, without any copy between hosts.
"""

from __future__ import annotations

import os
import pathlib
import queue
import threading
from typing import Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from m11b_jax import sharding
from m11b_jax.axis_names import BATCH
from m11b_jax.blocks import BlockBatcher, TokenBlocks, iter_batches
from m11b_jax.dictionary import Dictionary
from m11b_jax.errors import UserError
from m11b_jax.indexed_dataset import MMapIndexedDataset, split_prefix


def load_dictionary(data_path: str | os.PathLike, vocab_size: int) -> Dictionary:
    """`DATA_PATH/dict.txt`, checked against the model's vocabulary size."""
    data = pathlib.Path(data_path)
    if not data.is_dir():
        raise UserError(f"DATA_PATH {data} is not a directory: pass a fairseq data-bin (fairseq-preprocess "
                        "--only-source ... --destdir DIR, or python -m m11b_jax.preprocess), or omit it to train on "
                        "the offline corpus")
    path = data / "dict.txt"
    if not path.is_file():
        raise UserError(f"{path} not found: a data-bin holds the dict.txt it was binarized with; re-run preprocess")
    d = Dictionary.load(path)
    if len(d) > vocab_size:
        raise UserError(f"the dictionary {path} has {len(d)} symbols (4 specials + {len(d) - 4} lines) but the model's "
                        f"vocabulary is {vocab_size}: use an --arch with vocab_size >= {len(d)} or a smaller dictionary")
    return d


def load_split(data_path: str | os.PathLike, split: str, tokens_per_sample: int, flag: str,
               dictionary_size: int | None = None) -> TokenBlocks:
    """The split's blocks; with `dictionary_size`, every token id is checked to be a dictionary index (an id
    beyond the model's vocabulary would make the loss NaN; one beyond dict.txt means another dictionary)."""
    prefix = split_prefix(data_path, split, f"binarize it or pass another {flag}")
    dataset = MMapIndexedDataset(prefix)
    if dictionary_size is not None:
        check_token_ids(dataset.tokens(), dictionary_size, f"{prefix}.bin")
    return TokenBlocks.from_dataset(dataset, tokens_per_sample)


def check_token_ids(tokens: np.ndarray, dictionary_size: int, where: str, chunk: int = 1 << 24) -> None:
    """UserError naming the first token id >= dictionary_size (or < 0); reads the stream in chunks."""
    for start in range(0, tokens.size, chunk):
        part = np.asarray(tokens[start:start + chunk])
        bad = (part >= dictionary_size) | (part < 0) if part.dtype.kind == "i" else part >= dictionary_size
        if bad.any():
            i = int(np.argmax(bad))
            raise UserError(f"{where} holds token id {int(part[i])} at position {start + i}, but dict.txt has "
                            f"{dictionary_size} symbols (ids 0..{dictionary_size - 1}): the split was binarized "
                            "with another dictionary; re-binarize it with this data-bin's dict.txt")


def host_data_share(mesh: Mesh) -> tuple[int, int]:
    """(number of data shards, this process's shard): the contiguous `data` rows its devices hold.

    Processes whose devices hold the same `data` rows (a model-parallel group spanning hosts) read the
    same shard.
    """
    me = jax.process_index()
    rows = sorted({i for i in range(mesh.devices.shape[0]) if any(d.process_index == me for d in mesh.devices[i])})
    n_rows = mesh.devices.shape[0]
    if not rows or rows != list(range(rows[0], rows[0] + len(rows))) or n_rows % len(rows) or rows[0] % len(rows):
        raise UserError(f"process {me} holds data rows {rows} of the {n_rows}-row mesh, not one contiguous equal share: "
                        "use the same number of devices on every host and a --model-parallel-size that divides it")
    return n_rows // len(rows), rows[0] // len(rows)


def global_batch_size(batch_size: int, mesh: Mesh) -> int:
    return batch_size * mesh.shape[sharding.DATA]


def to_global(local: dict[str, np.ndarray], mesh: Mesh, global_rows: int, rules) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays, rows (dimension -2) placed as the table places the
    batch axis (default: over `data`)."""
    out = {}
    for name, arr in local.items():
        placement = sharding.named_sharding(mesh, rules, (*([None] * (arr.ndim - 2)), BATCH, None))
        shape = (*arr.shape[:-2], global_rows, arr.shape[-1])
        out[name] = jax.make_array_from_process_local_data(placement, arr, shape)
    return out


class TrainBatches:
    """Endless training updates: {'source','target'} [update_freq, global_batch, T] global arrays.

    With `prefetch` > 0 a background thread prepares that many updates ahead. `state_dict()` is the
    position after the last update *returned* (not the last prepared), so a checkpoint resumes exactly.
    """

    def __init__(self, blocks: TokenBlocks, mesh: Mesh, batch_size: int, update_freq: int, seed: int,
                 prefetch: int = 0, *, rules):
        self.mesh, self.rules = mesh, rules
        self.update_freq = update_freq
        self.global_rows = global_batch_size(batch_size, mesh)
        num_shards, shard_index = host_data_share(mesh)
        self.batcher = BlockBatcher(blocks, self.global_rows, seed=seed, shuffle=True, num_shards=num_shards,
                                    shard_index=shard_index)
        self.prefetch = max(0, int(prefetch))
        self._state = self.batcher.state_dict()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("load_state_dict before the first batch")
        self.batcher.load_state_dict(state)
        self._state = self.batcher.state_dict()

    def state_dict(self) -> dict:
        return dict(self._state)

    def _make(self) -> tuple[dict[str, np.ndarray], dict]:
        micro = [self.batcher.next_batch() for _ in range(self.update_freq)]
        local = {k: np.stack([m[k] for m in micro]) for k in ("source", "target")}
        return local, self.batcher.state_dict()

    def _worker(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._make()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced in next()
            self._queue.put(e)

    def next(self) -> dict[str, jax.Array]:
        if self.prefetch == 0:
            local, state = self._make()
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=self._worker, name="batch-prefetch", daemon=True)
                self._thread.start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            local, state = item
        self._state = state
        return to_global(local, self.mesh, self.global_rows, self.rules)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def valid_batches(blocks: TokenBlocks, mesh: Mesh, batch_size: int, rules) -> Iterator[dict[str, jax.Array]]:
    """Every block of a split once, in order, as global [global_batch, T] arrays (last batch padded)."""
    rows = global_batch_size(batch_size, mesh)
    num_shards, shard_index = host_data_share(mesh)
    for local in iter_batches(blocks, rows, num_shards=num_shards, shard_index=shard_index):
        yield to_global(local, mesh, rows, rules)


def fairseq_blocks_per_batch(max_tokens: int | None, tokens_per_sample: int, max_sentences: int | None = None,
                             required_batch_size_multiple: int = 8) -> int:
    """Blocks per batch (per data-parallel replica) as fairseq's `batch_by_size` forms them from a token budget,
    with `--sample-break-mode none` (every block holds tokens_per_sample tokens).

    fairseq adds blocks while (blocks + 1) x block length <= max_tokens and blocks < max_sentences; a full batch
    of n blocks is cut to max(m * (n // m), n % m) with m = --required-batch-size-multiple, the rest carried
    into the next batch. With equal blocks every batch but the last is that size: 12 fit -> 8 taken (m 8),
    6 fit -> 6. A block longer than max_tokens is an error (fairseq: "exceeds max_tokens").
    """
    if max_tokens is not None and max_tokens < tokens_per_sample:
        raise UserError(f"--max-tokens {max_tokens} is smaller than one block (--tokens-per-sample "
                        f"{tokens_per_sample}): raise --max-tokens to at least {tokens_per_sample}")
    if required_batch_size_multiple < 1:
        raise UserError(f"--required-batch-size-multiple {required_batch_size_multiple} must be >= 1")
    fit = [n for n in (max_tokens // tokens_per_sample if max_tokens is not None else None, max_sentences)
           if n is not None]
    if not fit:
        raise UserError("give --batch-size (--max-sentences) or --max-tokens")
    n, m = min(fit), required_batch_size_multiple  # whichever limit closes the batch, fairseq rounds it alike
    return max(m * (n // m), n % m)

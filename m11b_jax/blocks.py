"""Language-model blocks over a token stream (fairseq `--sample-break-mode none`) and batch iterators.

`TokenBlocks(tokens, T)` cuts the 1-D stream (all sequences back to back, each ending in `</s>`)
into blocks of T tokens across line boundaries, exactly as fairseq's TokenBlockDataset in 'none'
mode with include_targets: block i's target is `stream[i*T : (i+1)*T]` and its source is the
stream shifted right by one, `stream[i*T-1 : (i+1)*T-1]`, with `</s>` (index 2) before the very
first token. (fairseq puts `</s>` before any block that starts a sequence; every sequence of a
fairseq data-bin ends with `</s>`, so that is the stream's previous token: the same shift.)
fairseq keeps the final short block (ceil(N/T) blocks; its TokenBlockDataset slices
`[i*T, min((i+1)*T, N))`), and so do we: batches pad it on the right with `<pad>` (index 1) in
both source and target, and a loss must skip targets equal to pad, as fairseq's does.

`BlockBatcher` serves training: each epoch visits every block once in the order of a seeded
permutation, `np.random.default_rng((seed, epoch))`, G blocks per global batch; each data-parallel
host (shard) takes its own contiguous rows of that global batch, so the global batch does not
depend on the number of hosts. Its state is (epoch, position): saved in a checkpoint, it resumes
with exactly the batches an uninterrupted run would have seen (with any number of hosts).

`iter_batches` serves evaluation: blocks in order, the last batch padded with pad rows.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from .dictionary import EOS, PAD
from .errors import UserError


class TokenBlocks:
    """Blocks of `block_size` tokens over a 1-D token stream (a memmap stays a memmap)."""

    def __init__(self, tokens: np.ndarray, block_size: int, *, eos: int = EOS, pad: int = PAD):
        tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
        if tokens.ndim != 1:
            raise ValueError(f"the token stream must be 1-D, got shape {tokens.shape}")
        if block_size < 1:
            raise UserError(f"tokens-per-sample must be at least 1, got {block_size}")
        if tokens.size == 0:
            raise UserError("the dataset holds no tokens: binarize some text first (python -m m11b_jax.preprocess)")
        if block_size > tokens.size:
            raise UserError(
                f"tokens-per-sample {block_size} is larger than the data ({tokens.size} tokens): "
                "lower --tokens-per-sample or use more data"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.eos, self.pad = eos, pad

    @classmethod
    def from_dataset(cls, dataset, block_size: int) -> "TokenBlocks":
        """Blocks over an `MMapIndexedDataset`'s whole stream."""
        return cls(dataset.tokens(), block_size)

    def __len__(self) -> int:
        return math.ceil(self.tokens.size / self.block_size)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, target) of block i as int32; only the last block may be shorter than block_size."""
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range for {len(self)} blocks")
        start = i * self.block_size
        end = min(start + self.block_size, self.tokens.size)
        target = np.asarray(self.tokens[start:end], dtype=np.int32)
        if start == 0:
            source = np.concatenate([[self.eos], self.tokens[: end - 1]]).astype(np.int32)
        else:
            source = np.asarray(self.tokens[start - 1 : end - 1], dtype=np.int32)
        return source, target

    def fill(self, block_ids, rows: int) -> dict[str, np.ndarray]:
        """A [rows, block_size] batch of the given blocks; missing rows and positions are pad."""
        source = np.full((rows, self.block_size), self.pad, dtype=np.int32)
        target = np.full((rows, self.block_size), self.pad, dtype=np.int32)
        for row, i in enumerate(block_ids):
            s, t = self[int(i)]
            source[row, : s.size] = s
            target[row, : t.size] = t
        return {"source": source, "target": target}


def _check_sharding(global_batch_size: int, num_shards: int, shard_index: int) -> int:
    if global_batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {global_batch_size}")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise UserError(f"shard_index {shard_index} is not in 0..{num_shards - 1}: check the host count and index")
    if global_batch_size % num_shards:
        raise UserError(
            f"global batch size {global_batch_size} is not divisible by {num_shards} shards (hosts): "
            "make the batch size a multiple of the number of data-parallel shards"
        )
    return global_batch_size // num_shards


class BlockBatcher:
    """Endless, seeded, shardable, resumable training batches of `TokenBlocks`.

    `next_batch()` returns {'source', 'target'}: int32 [global_batch_size // num_shards,
    block_size], this shard's rows of the global batch. With drop_last (default) the blocks left
    over after the last full global batch of an epoch are skipped that epoch (a different set
    each epoch, since the order changes); without it the last batch is filled with pad rows.
    """

    def __init__(
        self,
        blocks: TokenBlocks,
        global_batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        num_shards: int = 1,
        shard_index: int = 0,
        drop_last: bool = True,
    ):
        self.local_batch_size = _check_sharding(global_batch_size, num_shards, shard_index)
        if drop_last and len(blocks) < global_batch_size:
            raise UserError(
                f"the data gives {len(blocks)} blocks of {blocks.block_size} tokens, fewer than one global batch "
                f"of {global_batch_size}: lower the batch size or --tokens-per-sample, or use more data"
            )
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed!r}")
        self.blocks = blocks
        self.global_batch_size = global_batch_size
        self.num_shards, self.shard_index = num_shards, shard_index
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed = int(seed)
        self._epoch, self._position = 0, 0
        self._order_epoch, self._order = None, None

    @property
    def epoch(self) -> int:
        """The epoch (from 0) that the next batch comes from."""
        return self._epoch

    def batches_per_epoch(self) -> int:
        n, g = len(self.blocks), self.global_batch_size
        return n // g if self.drop_last else math.ceil(n / g)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which `epoch` visits the blocks (a permutation of range(len(blocks)))."""
        if self._order_epoch != epoch:
            n = len(self.blocks)
            self._order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> dict[str, np.ndarray]:
        g, b = self.global_batch_size, self.local_batch_size
        order = self.epoch_order(self._epoch)
        global_ids = order[self._position * g : (self._position + 1) * g]
        batch = self.blocks.fill(global_ids[self.shard_index * b : (self.shard_index + 1) * b], b)
        self._position += 1
        if self._position == self.batches_per_epoch():
            self._epoch, self._position = self._epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """JSON-serializable position; the other fields guard against resuming on different data."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "num_blocks": len(self.blocks),
            "block_size": self.blocks.block_size,
            "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (seed included); the data and global batch must be the same."""
        mine = self.state_dict()
        for key in ("num_blocks", "block_size", "global_batch_size", "shuffle", "drop_last"):
            if key in state and state[key] != mine[key]:
                raise UserError(
                    f"cannot resume the data order: the checkpoint has {key}={state[key]} but this run has "
                    f"{mine[key]}; resume with the same data, --tokens-per-sample and global batch size"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch():
            raise UserError(f"data state epoch={epoch} position={position} is out of range: the checkpoint is damaged")
        self.seed = int(state.get("seed", self.seed))
        self._epoch, self._position = epoch, position
        self._order_epoch = None


def iter_batches(
    blocks: TokenBlocks, batch_size: int, *, num_shards: int = 1, shard_index: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """All blocks once, in order, as {'source', 'target'} int32 [batch_size // num_shards, T].

    For evaluation: nothing is dropped; the last global batch is filled with pad rows, and the
    short last block with pad positions, so `target != pad` is the mask of tokens to score.
    """
    b = _check_sharding(batch_size, num_shards, shard_index)
    for start in range(0, len(blocks), batch_size):
        global_ids = np.arange(start, min(start + batch_size, len(blocks)))
        yield blocks.fill(global_ids[shard_index * b : (shard_index + 1) * b], b)

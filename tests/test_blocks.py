"""Token blocks (fairseq --sample-break-mode none) and the training/eval batch iterators."""

import json
import math

import numpy as np
import pytest

from m11b_jax.blocks import BlockBatcher, TokenBlocks, iter_batches
from m11b_jax.errors import UserError
from m11b_jax.indexed_dataset import MMapIndexedDataset, write_dataset

PAD, EOS = 1, 2


def stream(n: int) -> np.ndarray:
    return np.arange(10, 10 + n, dtype=np.int64)  # distinct tokens, none equal to pad or eos


def test_blocks_match_fairseq_none_mode():
    tokens = stream(10)
    blocks = TokenBlocks(tokens, 4)
    assert len(blocks) == 3  # ceil(10 / 4): the short final block is kept, as in fairseq
    shifted = np.concatenate([[EOS], tokens])
    for i in range(3):
        source, target = blocks[i]
        start, end = 4 * i, min(4 * i + 4, 10)
        assert target.tolist() == tokens[start:end].tolist()
        assert source.tolist() == shifted[start:end].tolist()
    assert blocks[0][0][0] == EOS
    assert blocks[2][1].size == 2
    assert np.concatenate([blocks[i][1] for i in range(3)]).tolist() == tokens.tolist()


def test_blocks_over_a_binarized_dataset(tmp_path):
    write_dataset(tmp_path / "train", [[5, 6, 2], [7, 2], [8, 9, 10, 2]], np.uint16)
    ds = MMapIndexedDataset(tmp_path / "train")
    blocks = TokenBlocks.from_dataset(ds, 3)
    assert [blocks[i][1].tolist() for i in range(len(blocks))] == [[5, 6, 2], [7, 2, 8], [9, 10, 2]]
    assert [blocks[i][0].tolist() for i in range(len(blocks))] == [[2, 5, 6], [2, 7, 2], [8, 9, 10]]
    assert blocks[1][0].dtype == np.int32


def test_fill_pads_short_block():
    batch = TokenBlocks(stream(10), 4).fill([2, 0], rows=3)
    assert batch["target"].tolist() == [[18, 19, PAD, PAD], [10, 11, 12, 13], [PAD] * 4]
    assert batch["source"].tolist() == [[17, 18, PAD, PAD], [EOS, 10, 11, 12], [PAD] * 4]


def epoch_targets(batcher: BlockBatcher) -> list:
    rows = []
    for _ in range(batcher.batches_per_epoch()):
        rows += batcher.next_batch()["target"].tolist()
    return rows


def test_every_token_once_per_epoch():
    tokens = stream(1000)
    batcher = BlockBatcher(TokenBlocks(tokens, 16), 8, seed=3, drop_last=False)
    assert batcher.batches_per_epoch() == math.ceil(63 / 8)
    for epoch in range(2):
        assert batcher.epoch == epoch
        seen = [t for row in epoch_targets(batcher) for t in row if t != PAD]
        assert sorted(seen) == tokens.tolist()
    assert batcher.epoch == 2


def test_drop_last_skips_remainder_blocks_only():
    blocks = TokenBlocks(stream(1000), 16)  # 63 blocks
    batcher = BlockBatcher(blocks, 8, seed=3)
    assert batcher.batches_per_epoch() == 7
    rows = epoch_targets(batcher)
    firsts = [row[0] for row in rows]
    assert len(set(firsts)) == len(firsts) == 56  # 56 distinct blocks, none twice
    expected = np.random.default_rng((3, 0)).permutation(63)[:56]
    assert firsts == [10 + 16 * int(i) for i in expected]
    assert batcher.epoch == 1


def test_shuffle_is_seeded_and_changes_per_epoch():
    blocks = TokenBlocks(stream(4000), 8)

    def first_batches(seed):
        b = BlockBatcher(blocks, 10, seed=seed)
        out = [b.next_batch()["target"] for _ in range(b.batches_per_epoch() + 1)]
        return out[0], out[-1]  # first batch of epoch 0 and of epoch 1

    a0, a1 = first_batches(0)
    b0, _ = first_batches(0)
    c0, _ = first_batches(1)
    assert np.array_equal(a0, b0)
    assert not np.array_equal(a0, a1)
    assert not np.array_equal(a0, c0)
    plain = BlockBatcher(blocks, 10, seed=0, shuffle=False).next_batch()
    assert plain["target"][:, 0].tolist() == [10 + 8 * i for i in range(10)]


def test_resume_gives_identical_batches():
    blocks = TokenBlocks(stream(3000), 16)
    reference = BlockBatcher(blocks, 6, seed=11)
    expected = [reference.next_batch() for _ in range(90)]  # crosses epoch boundaries (31 per epoch)
    for stop in (0, 5, 31, 40):
        run = BlockBatcher(blocks, 6, seed=11)
        for _ in range(stop):
            run.next_batch()
        state = json.loads(json.dumps(run.state_dict()))
        resumed = BlockBatcher(blocks, 6, seed=999)  # the checkpoint's seed wins
        resumed.load_state_dict(state)
        assert resumed.epoch == stop // 31
        for want in expected[stop : stop + 35]:
            got = resumed.next_batch()
            assert np.array_equal(got["source"], want["source"]) and np.array_equal(got["target"], want["target"])


def test_two_shards_are_disjoint_and_cover_the_global_batch():
    blocks = TokenBlocks(stream(5000), 32)
    whole = BlockBatcher(blocks, 8, seed=5)
    shards = [BlockBatcher(blocks, 8, seed=5, num_shards=2, shard_index=k) for k in range(2)]
    for _ in range(whole.batches_per_epoch() + 3):
        g = whole.next_batch()
        parts = [s.next_batch() for s in shards]
        assert parts[0]["target"].shape == (4, 32)
        assert np.array_equal(np.concatenate([p["target"] for p in parts]), g["target"])
        assert np.array_equal(np.concatenate([p["source"] for p in parts]), g["source"])
        assert not set(parts[0]["target"][:, 0]) & set(parts[1]["target"][:, 0])


def test_resume_on_a_different_number_of_hosts():
    blocks = TokenBlocks(stream(5000), 32)
    one = BlockBatcher(blocks, 8, seed=5)
    for _ in range(7):
        one.next_batch()
    state = one.state_dict()
    expected = one.next_batch()["target"]
    parts = []
    for k in range(4):
        b = BlockBatcher(blocks, 8, seed=5, num_shards=4, shard_index=k)
        b.load_state_dict(state)
        parts.append(b.next_batch()["target"])
    assert np.array_equal(np.concatenate(parts), expected)


def test_iter_batches_sequential_and_padded():
    blocks = TokenBlocks(stream(100), 16)  # 7 blocks, the last of 4 tokens
    batches = list(iter_batches(blocks, 3))
    assert len(batches) == 3
    targets = np.concatenate([b["target"] for b in batches])
    assert targets.shape == (9, 16)
    assert targets[targets != PAD].tolist() == stream(100).tolist()
    assert (targets[7:] == PAD).all() and (batches[-1]["source"][1:] == PAD).all()
    sharded = [list(iter_batches(blocks, 4, num_shards=2, shard_index=k)) for k in range(2)]
    merged = np.concatenate([np.concatenate([a["target"], b["target"]]) for a, b in zip(*sharded)])
    assert np.array_equal(merged[:7], targets[:7])


# ---- bad input ------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(UserError, match="larger than the data"):
        TokenBlocks(stream(10), 11)
    with pytest.raises(UserError, match="holds no tokens"):
        TokenBlocks(np.zeros(0, np.uint16), 4)
    with pytest.raises(UserError, match="at least 1"):
        TokenBlocks(stream(10), 0)
    blocks = TokenBlocks(stream(100), 4)
    with pytest.raises(UserError, match="not divisible by 3 shards"):
        BlockBatcher(blocks, 8, seed=0, num_shards=3)
    with pytest.raises(UserError, match="shard_index 2"):
        BlockBatcher(blocks, 8, seed=0, num_shards=2, shard_index=2)
    with pytest.raises(UserError, match="fewer than one global batch"):
        BlockBatcher(blocks, 64, seed=0)
    with pytest.raises(UserError, match="seed"):
        BlockBatcher(blocks, 8, seed=-1)
    with pytest.raises(UserError, match="not divisible"):
        next(iter_batches(blocks, 5, num_shards=2))


def test_resume_on_different_data_is_refused():
    state = BlockBatcher(TokenBlocks(stream(100), 4), 5, seed=0).state_dict()
    other = BlockBatcher(TokenBlocks(stream(120), 4), 5, seed=0)
    with pytest.raises(UserError, match="num_blocks=25 but this run has 30"):
        other.load_state_dict(state)
    bigger = BlockBatcher(TokenBlocks(stream(100), 4), 10, seed=0)
    with pytest.raises(UserError, match="global_batch_size"):
        bigger.load_state_dict(state)

"""fairseq Dictionary: dict.txt reading/writing, --padding-factor padding, line encoding."""

import numpy as np
import pytest

from m11b_jax.dictionary import Dictionary
from m11b_jax.errors import UserError


@pytest.fixture(scope="module")
def gpt2_dict(shared_data):
    return Dictionary.load(shared_data / "gpt2_bpe" / "dict.txt")


def test_gpt2_dict_layout(gpt2_dict, shared_data):
    lines = (shared_data / "gpt2_bpe" / "dict.txt").read_text().splitlines()
    assert len(gpt2_dict) == len(lines) + 4 == 50264
    assert gpt2_dict.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (gpt2_dict.bos(), gpt2_dict.pad(), gpt2_dict.eos(), gpt2_dict.unk()) == (0, 1, 2, 3)
    for k in (0, 1, 1000, len(lines) - 1):
        symbol, count = lines[k].split(" ")
        assert gpt2_dict.index(symbol) == 4 + k
        assert gpt2_dict[4 + k] == symbol
        assert gpt2_dict.counts[4 + k] == int(count)
    assert gpt2_dict.index("not-a-symbol") == 3
    assert gpt2_dict[10**6] == "<unk>"


def test_save_round_trip_is_byte_identical(gpt2_dict, shared_data, tmp_path):
    gpt2_dict.save(tmp_path / "dict.txt")
    assert (tmp_path / "dict.txt").read_bytes() == (shared_data / "gpt2_bpe" / "dict.txt").read_bytes()
    assert Dictionary.load(tmp_path / "dict.txt") == gpt2_dict


def test_padding_reproduces_release_dictionary(shared_data, tmp_path):
    d = Dictionary.load(shared_data / "gpt2_bpe" / "dict.txt").pad_to_multiple(51200)
    assert len(d) == 51200
    d.save(tmp_path / "dict.51200.txt")
    assert (tmp_path / "dict.51200.txt").read_bytes() == (shared_data / "gpt2_bpe" / "dict.51200.txt").read_bytes()
    assert Dictionary.load(shared_data / "gpt2_bpe" / "dict.51200.txt") == d


def test_pad_to_multiple_small():
    d = Dictionary()
    for w in "a b c".split():
        d.add_symbol(w)
    d.pad_to_multiple(8)
    assert (
        d.symbols[4:]
        == ["a", "b", "c", "madeupword0000", "madeupword0001", "madeupword0002", "madeupword0003", "madeupword0004"][
            : len(d) - 4
        ]
    )
    assert len(d) == 8 and d.counts[-1] == 0
    assert len(d.pad_to_multiple(8)) == 8  # already a multiple: unchanged
    assert len(d.pad_to_multiple(1)) == 8
    with pytest.raises(UserError, match="positive"):
        d.pad_to_multiple(0)


def test_encode_line():
    d = Dictionary()
    for w in ["hello", "world", "<unk>x"]:
        d.add_symbol(w)
    ids = d.encode_line("hello  world\tnope \u00a0hello\n")
    assert ids.dtype == np.int32
    assert ids.tolist() == [4, 5, 3, 4, 2]
    assert d.encode_line("hello", append_eos=False).tolist() == [4]
    assert d.encode_line("   ").tolist() == [2]
    flat, sizes, replaced = d.encode_lines(["hello nope", "", "<unk> world zz"])
    assert flat.tolist() == [4, 3, 2, 2, 3, 5, 3, 2]
    assert sizes.tolist() == [3, 1, 4]
    assert replaced == 2  # "nope" and "zz"; a literal <unk> is not a replacement


def test_overwrite_flag(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("a 5\nb 3\na 7 #fairseq:overwrite\n")
    d = Dictionary.load(path)
    assert d.symbols[4:] == ["a", "b", "a"]
    assert d.index("a") == 6
    assert d.counts[6] == 7


def test_symbol_with_spaces(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("a b 5\n")
    assert Dictionary.load(path).symbols[4:] == ["a b"]


# ---- bad input ------------------------------------------------------------------------------


def test_missing_dict(tmp_path):
    with pytest.raises(UserError, match="dictionary not found"):
        Dictionary.load(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    "content, match",
    [
        (b"a 1\nnocount\n", "line 2: expected '<symbol> <count>'"),
        (b"a 1\nb x\n", "line 2: expected"),
        (b"a 1\n\n", "line 2: expected"),
        (b"a 1\nb 2\na 3\n", "line 3: duplicate symbol 'a'"),
        (b"</s> 1\n", "line 1: duplicate symbol '</s>'"),
        (b"a 1\nb 2\n\xff\xfe 3\n", "line 3 is not UTF-8"),
    ],
)
def test_malformed_dict(tmp_path, content, match):
    path = tmp_path / "dict.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=match) as e:
        Dictionary.load(path)
    assert "\n" not in str(e.value)


def test_save_failure_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "dict.txt"
    path.write_text("old 1\n")

    class Boom:  # a count that fails to format: the write stops half-way
        def __format__(self, spec):
            raise RuntimeError("disk full")

    d = Dictionary()
    d.add_symbol("x")
    d.add_symbol("y", 0)
    d.counts[-1] = Boom()
    with pytest.raises(RuntimeError):
        d.save(path)
    assert path.read_text() == "old 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dict.txt"]

"""GPT-2 BPE: our two engines, tiktoken built from the same files, and a reference written here.

The reference below follows the published algorithm (GPT-2's encoder.py as described in its
paper/repo) but is written independently of m11b_jax.tokenizer: it works on bytes, not on the
printable-character alphabet, and merges one leftmost lowest-rank pair per step.
"""

import json
import random
import unicodedata

import pytest
import regex
import tiktoken

from m11b_jax.errors import UserError
from m11b_jax.tokenizer import GPT2BPE

PUBLISHED_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class ReferenceBPE:
    """GPT-2 BPE from the published algorithm, on byte strings."""

    def __init__(self, encoder_json, vocab_bpe):
        # GPT-2's byte alphabet: printable Latin-1 bytes are themselves, the rest U+0100.. in order.
        printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
        char_of_byte, next_extra = {}, 256
        for b in range(256):
            if b in printable:
                char_of_byte[b] = chr(b)
            else:
                char_of_byte[b] = chr(next_extra)
                next_extra += 1
        byte_of_char = {c: b for b, c in char_of_byte.items()}

        def to_bytes(token: str) -> bytes:
            return bytes(byte_of_char[c] for c in token)

        with open(encoder_json, encoding="utf-8") as f:
            self.id_of = {to_bytes(tok): i for tok, i in json.load(f).items()}
        with open(vocab_bpe, encoding="utf-8") as f:
            merge_lines = [line for line in f.read().split("\n")[1:] if line]
        self.rank = {}
        for r, line in enumerate(merge_lines):
            a, b = line.split(" ")
            self.rank[(to_bytes(a), to_bytes(b))] = r
        self.pattern = regex.compile(PUBLISHED_PATTERN)
        self.cache = {}

    def piece(self, piece: str) -> tuple:
        if piece not in self.cache:
            self.cache[piece] = self.merge(piece)
        return self.cache[piece]

    def merge(self, piece: str) -> tuple:
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while True:
            candidates = [(self.rank[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in self.rank]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return tuple(self.id_of[p] for p in parts)

    def encode(self, text: str) -> list:
        return [i for piece in self.pattern.findall(text) for i in self.piece(piece)]


@pytest.fixture(scope="module")
def files(shared_data):
    return shared_data / "gpt2_bpe" / "encoder.json", shared_data / "gpt2_bpe" / "vocab.bpe"


@pytest.fixture(scope="module")
def bpe(files):
    tok = GPT2BPE.from_files(*files)
    assert tok.engine == "tiktoken"
    return tok


@pytest.fixture(scope="module")
def reference(files):
    return ReferenceBPE(*files)


@pytest.fixture(scope="module")
def tiktoken_gpt2(files):
    """tiktoken's GPT-2 encoding rebuilt from the local files (tiktoken's own recipe: ranks = ids)."""
    ref = ReferenceBPE(*files)
    ranks = {b: i for b, i in ref.id_of.items() if i != 50256}
    return tiktoken.Encoding("gpt2-files", pat_str=PUBLISHED_PATTERN, mergeable_ranks=ranks, special_tokens={})


ADVERSARIAL = [
    "",
    "Hello world",
    "I'm, you're, he's, we'll, they've, I'd, don't, O'NEIL'S 'S 'LL",
    "emoji 😀😃👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 keycap 1️⃣ ❤️",
    "combining: e\u0301 a\u0300\u0323 Z\u0335\u0337\u0338 \u0915\u094d\u0937",
    "controls: \x00\x01\x07\x08\x0b\x0c\x1b\x1c\x1d\x1f\x7f\x85 \u200b\u200d\ufeff\u2028\u2029",
    " " * 1000 + "x" + "\t \n " * 50 + "\n\n\n",
    "   leading and trailing   ",
    "digits 0123456789 12345678901234567890 ١٢٣ ४२ ²³ ½ Ⅻ 3.14159e-10",
    "CJK 日本語のテキスト 中文文本 한국어 텍스트",
    "RTL עברית العربية",
    "mixed\u00a0nbsp\u2003em\u3000ideographic space",
    "<|endoftext|> is plain text here",
    "unassigned \u0378 \u0c5c \U000e0080 \U0010fffd private \ue000",
    "a" * 3000,
    "\r\n windows\r\nline\rends",
]


def test_vocab_sizes(bpe, reference):
    assert bpe.vocab_size == 50257 == len(reference.id_of)
    assert len(bpe.merge_ranks) == 50000


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_strings_all_engines_agree(bpe, reference, tiktoken_gpt2, text):
    expected = reference.encode(text)
    assert bpe.encode(text) == expected
    assert bpe.encode_python(text) == expected
    if all(unicodedata.category(c) != "Cn" for c in text):  # tiktoken's own Unicode tables: see module doc
        assert tiktoken_gpt2.encode_ordinary(text) == expected
    assert bpe.decode(expected) == text


def test_wikitext_all_engines_agree(bpe, reference, tiktoken_gpt2, shared_data):
    text = (shared_data / "wikitext-103" / "wiki.test.raw").read_text(encoding="utf-8")
    expected = reference.encode(text)
    assert len(expected) > 250_000
    assert bpe.encode(text) == expected
    assert bpe.encode_python(text) == expected
    assert tiktoken_gpt2.encode_ordinary(text) == expected
    assert bpe.decode(expected) == text


def test_known_ids(bpe):
    # Independent of every implementation here: well-known GPT-2 ids.
    assert bpe.encode("Hello world") == [15496, 995]
    assert bpe.encode(" the") == [262]
    assert bpe.decode([50256]) == "<|endoftext|>"


def test_every_vocab_token_text(bpe, reference):
    """Each vocabulary entry that is valid UTF-8, encoded alone and all joined together."""
    texts = []
    for b in reference.id_of:
        try:
            texts.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    assert len(texts) > 49_000
    for t in texts[::7]:
        assert bpe.encode_python(t) == reference.encode(t) == bpe.encode(t)
    joined = "".join(texts)
    assert bpe.encode(joined) == reference.encode(joined)


def test_random_strings(bpe, reference):
    rng = random.Random(1234)
    pools = ["abcXYZ ", "0123 ", "'sltdmvre ", " \t\n\r\x0b", "éàüß ", "😀🇫🇷\u200d ", "\u0301\u0308", "!?.,;:-—\"'"]
    for _ in range(300):
        chars = "".join(pools[rng.randrange(len(pools))] for _ in range(4))
        text = "".join(rng.choice(chars) for _ in range(rng.randrange(1, 60)))
        assert bpe.encode(text) == reference.encode(text) == bpe.encode_python(text), repr(text)


def test_tiktoken_guard_covers_every_assigned_character(bpe):
    """Where tiktoken is used (characters this Python's Unicode database knows), its pre-tokenizer
    must split exactly like the regex module; each character is tried in letter, digit, space and
    contraction contexts."""
    tt, pattern = bpe._tiktoken, regex.compile(PUBLISHED_PATTERN)
    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    for k in range(0, len(chars), 4096):
        text = "".join(f"a{c}{c}1 {c}'s {c}\n" for c in chars[k : k + 4096])
        by_pieces = [i for piece in pattern.findall(text) for i in tt.encode_ordinary(piece)]
        assert tt.encode_ordinary(text) == by_pieces, f"characters {chars[k]!r}..{chars[k + 4095]!r}"


def test_python_engine_forced(files, bpe):
    slow = GPT2BPE.from_files(*files, engine="python")
    assert slow.engine == "python"
    assert slow.encode("It's 2024 🚀") == bpe.encode("It's 2024 🚀")


def test_decode_bad_id(bpe):
    with pytest.raises(UserError, match="token id 99999"):
        bpe.decode([1, 99999])
    with pytest.raises(UserError, match="token id -1"):
        bpe.decode([-1])


# ---- bad files --------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_files(tmp_path, files):
    encoder, vocab = files
    with pytest.raises(UserError, match="encoder.json not found") as e:
        GPT2BPE.from_files(tmp_path / "nope.json", vocab)
    _one_line(e)
    with pytest.raises(UserError, match="vocab.bpe not found"):
        GPT2BPE.from_files(encoder, tmp_path / "nope.bpe")


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('["a", "b"]', "must map token strings"),
        ('{"a": "1"}', "must map token strings"),
        ('{"a": 1, "b": 1}', "same id"),
        (b"\xff\xfe{}", "not valid JSON"),
    ],
)
def test_malformed_encoder_json(tmp_path, files, content, match):
    path = tmp_path / "encoder.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=match) as e:
        GPT2BPE.from_files(path, files[1])
    _one_line(e)


def test_encoder_json_missing_byte_tokens(tmp_path, files):
    path = tmp_path / "encoder.json"
    path.write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(UserError, match="single-byte token"):
        GPT2BPE.from_files(path, files[1])


@pytest.mark.parametrize(
    "content, match",
    [
        ("Ġ t\nh e\n", "line 1 should be the '#version"),
        ("#version: 0.2\nĠ t\nonly-one\n", "line 3: expected two symbols"),
        ("#version: 0.2\n", "no merges"),
    ],
)
def test_malformed_vocab_bpe(tmp_path, files, content, match):
    path = tmp_path / "vocab.bpe"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=match) as e:
        GPT2BPE.from_files(files[0], path)
    _one_line(e)


def test_mismatched_files(tmp_path, files):
    path = tmp_path / "vocab.bpe"
    path.write_text("#version: 0.2\nq z\n", encoding="utf-8")  # "qz" is not a GPT-2 token
    with pytest.raises(UserError, match="do not belong together"):
        GPT2BPE.from_files(files[0], path)


def test_guard_sends_unassigned_characters_to_python(bpe):
    assert bpe._tiktoken_safe("plain ASCII") and bpe._tiktoken_safe("é — 日本 😀 🇫🇷")
    for text in ("x \u0378 y", "astral unassigned \U000e0080", "surrogate \ud800"):
        assert not bpe._tiktoken_safe(text), repr(text)

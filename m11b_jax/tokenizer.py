"""GPT-2 byte-level BPE (encoder.json + vocab.bpe), ids identical to OpenAI's GPT-2 encoder.

The algorithm, as published with GPT-2 and used by fairseq's `gpt2_bpe_utils`:

1. Pre-tokenize the text with `GPT2_PATTERN` (Python's `regex` module: contractions, optional
   space + letters, optional space + digits, optional space + other symbols, whitespace runs).
2. Map each piece's UTF-8 bytes to printable characters (`bytes_to_unicode`), so that every
   byte has a symbol in encoder.json.
3. Merge adjacent symbols, always the pair with the lowest rank in vocab.bpe (its line number),
   until no listed pair is left; look the resulting symbols up in encoder.json.

Two engines compute exactly this:

* ``"python"``: the regex above plus the merge loop, with a cache of pieces already seen.
* ``"tiktoken"`` (used by ``engine="auto"`` when tiktoken is installed): tiktoken's Rust
  encoder built from the same local files (no network). GPT-2's vocabulary gives every merged
  token the id ``256 + merge line``, so tiktoken's "merge the pair whose result has the lowest
  id" is the same rule; `from_files` checks that structure and otherwise stays on "python".
  tiktoken's regex engine carries its own Unicode tables, which can disagree with the `regex`
  module about characters assigned in recent Unicode versions. Text holding a character that
  this Python's `unicodedata` does not know is therefore encoded by the "python" engine.

Decoding joins the tokens' bytes and decodes UTF-8 with errors="replace", as GPT-2 does.
"""

from __future__ import annotations

import functools
import heapq
import json
import os
import re
import unicodedata
from typing import Iterable, Sequence

import regex

from .errors import UserError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENGINES = ("auto", "python", "tiktoken")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68
    bytes, in increasing order, get the characters U+0100, U+0101, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_encoder_json(path: str | os.PathLike) -> dict[str, int]:
    """Read encoder.json (token string -> id), with a one-line error for each way it can be wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            encoder = json.load(f)
    except FileNotFoundError:
        raise UserError(f"encoder.json not found: {path} (pass --encoder-json with GPT-2's encoder.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): re-download GPT-2's encoder.json") from None
    if not isinstance(encoder, dict) or not all(
        isinstance(k, str) and type(v) is int and v >= 0 for k, v in encoder.items()
    ):
        raise UserError(f"{path} must map token strings to non-negative integer ids: re-download GPT-2's encoder.json")
    if len(set(encoder.values())) != len(encoder):
        raise UserError(f"{path} gives the same id to two tokens: re-download GPT-2's encoder.json")
    return encoder


def load_vocab_bpe(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read vocab.bpe: a '#version' header line, then one merge 'left right' per line (rank = order)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise UserError(f"vocab.bpe not found: {path} (pass --vocab-bpe with GPT-2's vocab.bpe)") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 ({e}): re-download GPT-2's vocab.bpe") from None
    if not lines[0].startswith("#"):
        raise UserError(f"{path} line 1 should be the '#version: ...' header: is this GPT-2's vocab.bpe?")
    merges = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise UserError(
                f"{path} line {lineno}: expected two symbols 'left right', got {line!r}: re-download vocab.bpe"
            )
        merges.append((parts[0], parts[1]))
    if not merges:
        raise UserError(f"{path} holds no merges: re-download GPT-2's vocab.bpe")
    return merges


class GPT2BPE:
    """GPT-2 byte-level BPE tokenizer. Build with `from_files`; `encode(text)`, `decode(ids)`."""

    def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]], engine: str = "auto"):
        if engine not in ENGINES:
            raise UserError(f"unknown BPE engine {engine!r}: choose one of {', '.join(ENGINES)}")
        byte_map = bytes_to_unicode()
        missing = [c for c in byte_map.values() if c not in encoder]
        if missing:
            raise UserError(f"encoder.json lacks the single-byte token {missing[0]!r}: is it GPT-2's encoder.json?")
        for rank, (left, right) in enumerate(merges):
            if left + right not in encoder:
                raise UserError(
                    f"vocab.bpe merge {rank + 1} ({left!r} {right!r}) makes a token encoder.json lacks: "
                    "encoder.json and vocab.bpe do not belong together"
                )
        self.encoder = dict(encoder)
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._byte_map = byte_map
        self._byte_ids = [self.encoder[byte_map[b]] for b in range(256)]
        self._pairs: _PairTable | None = None  # built on the first long piece
        self._id_to_bytes = self._build_id_to_bytes(byte_map)
        self._pattern = regex.compile(GPT2_PATTERN)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._tiktoken = None
        self._safe_chars: set[str] = set()  # non-ASCII characters known to both regex engines
        if engine != "python":
            self._tiktoken = self._build_tiktoken(merges)
            if self._tiktoken is None and engine == "tiktoken":
                raise UserError(
                    "engine 'tiktoken' needs tiktoken installed and GPT-2-structured files: use engine 'auto'"
                )
        self.engine = "tiktoken" if self._tiktoken is not None else "python"

    @classmethod
    def from_files(
        cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike, engine: str = "auto"
    ) -> "GPT2BPE":
        """Load GPT-2's `encoder.json` and `vocab.bpe` (local files; nothing is downloaded)."""
        return cls(load_encoder_json(encoder_json), load_vocab_bpe(vocab_bpe), engine=engine)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    # ---- encoding ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (plain text: '<|endoftext|>' is not special, as in GPT-2's encoder)."""
        if self._tiktoken is not None and self._tiktoken_safe(text):
            return self._tiktoken.encode_ordinary(text)
        return self.encode_python(text)

    def encode_python(self, text: str) -> list[int]:
        """The pure-Python engine (regex pre-tokenizer + cached merges), whatever `engine` says."""
        ids: list[int] = []
        cache = self._cache
        for piece in self._pattern.findall(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = cache[piece] = self._bpe_piece(piece)
            ids.extend(piece_ids)
        if len(cache) > 500_000:  # bound memory on endless streams of new words
            cache.clear()
        return ids

    def _bpe_piece(self, piece: str) -> tuple[int, ...]:
        """Merge one pre-tokenized piece: repeatedly join every occurrence of the lowest-rank pair."""
        try:
            data = piece.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(
                f"text holds a lone surrogate in {piece!r}: it cannot be UTF-8 encoded; fix the input text"
            ) from None
        if len(data) > _SHORT_PIECE:
            if self._pairs is None:
                self._pairs = _PairTable(self.encoder, self.merge_ranks)
            return tuple(_merge_long([self._byte_ids[b] for b in data], self._pairs))
        symbols = _merge_short([self._byte_map[b] for b in data], self.merge_ranks)
        return tuple(self.encoder[s] for s in symbols)

    # ---- decoding ---------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD, as in GPT-2."""
        table = self._id_to_bytes
        ids = [int(i) for i in ids]
        try:
            if ids and min(ids) < 0:
                raise IndexError
            data = b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not (0 <= i < len(table) and table[i] is not None))
            raise UserError(f"token id {bad} is not in encoder.json (ids are 0..{len(table) - 1})") from None
        return data.decode("utf-8", errors="replace")

    def _build_id_to_bytes(self, byte_map: dict[int, str]) -> list[bytes]:
        char_to_byte = {c: b for b, c in byte_map.items()}
        table: list = [None] * (max(self.encoder.values()) + 1)
        for token, i in self.encoder.items():
            # Tokens outside the byte alphabet (none in GPT-2's file) decode as their UTF-8 text.
            if all(c in char_to_byte for c in token):
                table[i] = bytes(char_to_byte[c] for c in token)
            else:
                table[i] = token.encode("utf-8")
        return table

    # ---- tiktoken engine --------------------------------------------------------------------

    def _build_tiktoken(self, merges: Sequence[tuple[str, str]]):
        """A tiktoken.Encoding on the same files, or None when tiktoken or the file structure rules it out."""
        try:
            import tiktoken
        except ImportError:
            return None
        # tiktoken merges the pair whose concatenation has the lowest id: the same as GPT-2's rule
        # when the 256 byte tokens come first and merged tokens' ids increase with their merge rank.
        byte_ids = [self.encoder[c] for c in self._byte_map.values()]
        merged_ids = [self.encoder[a + b] for a, b in merges]
        if max(byte_ids) >= min(merged_ids) or any(x >= y for x, y in zip(merged_ids, merged_ids[1:])):
            return None
        ranks = {self._id_to_bytes[i]: i for i in [*byte_ids, *merged_ids]}
        if len(ranks) != len(byte_ids) + len(merged_ids):
            return None
        return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})

    def _tiktoken_safe(self, text: str) -> bool:
        """True when every character is one whose Unicode properties both regex engines agree on.

        Unassigned (in this Python's Unicode database) and surrogate characters go to "python".
        """
        if text.isascii() or _bmp_unassigned_or_astral().search(text) is None:
            return True
        new = set(text) - self._safe_chars  # astral (emoji, ...) or unassigned: look at each character
        if any(unicodedata.category(c) in ("Cn", "Cs") for c in new):
            return False
        self._safe_chars |= new
        return True


# ---- the merge loop -------------------------------------------------------------------------------

_SHORT_PIECE = 48  # symbols; longer pieces take the O(n log n) loop


def _merge_short(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """GPT-2's loop as published: join every occurrence (left to right) of the lowest-rank pair, repeat.

    O(n^2) in the piece's length: only for short pieces (words), where it is fastest.
    """
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(best[0] + best[1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


class _PairTable:
    """vocab.bpe's merges over token ids: (left id << shift | right id) -> (rank, merged id)."""

    def __init__(self, encoder: dict[str, int], ranks: dict[tuple[str, str], int]):
        self.shift = max(encoder.values()).bit_length()
        self.table = {(encoder[a] << self.shift) | encoder[b]: (rank, encoder[a + b]) for (a, b), rank in ranks.items()}


def _merge_long(ids: list[int], pairs: _PairTable) -> list[int]:
    """`_merge_short`'s result, over token ids, in O(n log n): a heap of (rank, position) over a linked list.

    Each round pops every heap entry of the lowest rank, in position order, and joins the pairs that are still
    there (an entry is stale once a neighbour merged); the pairs the joins create are pushed after the round,
    so one round equals one pass of `_merge_short` (which joins all occurrences of one pair before looking
    for the next) whatever the ranks of the new pairs.
    """
    table, shift = pairs.table, pairs.shift
    n = len(ids)
    sym = list(ids)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        hit = table.get((sym[i] << shift) | sym[i + 1])
        if hit is not None:
            heap.append((hit[0] << 32) | i)  # (rank, position) as one int: compares faster than a tuple
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        rank = heap[0] >> 32
        fresh = []
        while heap and heap[0] >> 32 == rank:
            i = pop(heap) & 0xFFFFFFFF
            j = nxt[i]
            if sym[i] < 0 or j >= n:
                continue
            hit = table.get((sym[i] << shift) | sym[j])
            if hit is None or hit[0] != rank:
                continue  # stale: a neighbour was merged since this entry was pushed
            sym[i] = hit[1]
            sym[j] = -1
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
            fresh.append(i)
        for i in fresh:
            if sym[i] < 0:
                continue
            p, k = prv[i], nxt[i]
            if p >= 0:
                hit = table.get((sym[p] << shift) | sym[i])
                if hit is not None:
                    push(heap, (hit[0] << 32) | p)
            if k < n:
                hit = table.get((sym[i] << shift) | sym[k])
                if hit is not None:
                    push(heap, (hit[0] << 32) | i)
    return [x for x in sym if x >= 0]


@functools.cache
def _bmp_unassigned_or_astral() -> "re.Pattern[str]":
    """A fast first check: BMP characters that are unassigned or surrogates, or any astral character.

    Python's `re` tests a BMP character class with a lookup table, a few ms per MB of text;
    listing the astral unassigned ranges as well would turn every test into a linear search.
    """
    ranges, start = [], None
    for c in range(0x10000):
        bad = unicodedata.category(chr(c)) in ("Cn", "Cs")
        if bad and start is None:
            start = c
        elif not bad and start is not None:
            ranges.append(f"\\u{start:04x}-\\u{c - 1:04x}")
            start = None
    if start is not None:
        ranges.append(f"\\u{start:04x}-\\uffff")
    return re.compile("[" + "".join(ranges) + "\\U00010000-\\U0010ffff]")

"""fairseq's `Dictionary`: the `dict.txt` symbol table that maps BPE ids (as text) to model indices.

`dict.txt` has one `<symbol> <count>` line per symbol (an optional trailing `#fairseq:overwrite`
flag lets a line replace an earlier duplicate). Four specials come first and are not in the file:
`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, so line k (from 0) is index 4 + k. A line is encoded
by splitting it on whitespace and mapping each word to its index, unknown words to `<unk>`, and
appending `</s>`.
"""

from __future__ import annotations

import itertools
import os
from typing import Iterable

import numpy as np

from .errors import UserError
from .textio import atomic_output, iter_lines

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BOS, PAD, EOS, UNK = range(4)
_OVERWRITE_FLAG = "#fairseq:overwrite"


class Dictionary:
    """Symbols <-> indices, with counts; indices 0..3 are the specials `<s> <pad> </s> <unk>`."""

    nspecial = len(SPECIALS)

    def __init__(self) -> None:
        self.symbols: list[str] = []
        self.counts: list[int] = []
        self.indices: dict[str, int] = {}
        for sym in SPECIALS:
            self.add_symbol(sym)

    # ---- reading and writing dict.txt -------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Dictionary":
        """Read a fairseq dict.txt; each malformed line is a UserError naming its line number."""
        if not os.path.isfile(path):
            raise UserError(f"dictionary not found: {path} (pass the fairseq dict.txt, e.g. gpt2_bpe/dict.txt)")
        d = cls()
        for lineno, line in enumerate(iter_lines(path), start=1):
            fields = line.rstrip().rsplit(" ", 1)
            overwrite = len(fields) == 2 and fields[1] == _OVERWRITE_FLAG
            if overwrite:
                fields = fields[0].rsplit(" ", 1)
            try:
                symbol, count = fields[0], int(fields[1])
            except (IndexError, ValueError):
                raise UserError(
                    f"{path} line {lineno}: expected '<symbol> <count>', got {line!r}: is this a fairseq dict.txt?"
                ) from None
            if symbol in d.indices and not overwrite:
                raise UserError(
                    f"{path} line {lineno}: duplicate symbol {symbol!r}: remove it, or end the line with "
                    f"'{_OVERWRITE_FLAG}' to replace the earlier entry"
                )
            d.add_symbol(symbol, count, overwrite=overwrite)
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Write dict.txt (specials omitted), all-or-nothing."""
        with atomic_output(path) as f:
            for symbol, count in zip(self.symbols[self.nspecial :], self.counts[self.nspecial :]):
                f.write(f"{symbol} {count}\n")

    # ---- building -----------------------------------------------------------------------

    def add_symbol(self, symbol: str, count: int = 1, overwrite: bool = False) -> int:
        """Index of `symbol`, appended if new; an existing symbol's count grows by `count`."""
        if symbol in self.indices and not overwrite:
            idx = self.indices[symbol]
            self.counts[idx] += count
            return idx
        idx = len(self.symbols)
        self.indices[symbol] = idx
        self.symbols.append(symbol)
        self.counts.append(count)
        return idx

    def pad_to_multiple(self, multiple: int) -> "Dictionary":
        """Append `madeupword0000`, `madeupword0001`, ... (count 0) until len(self) % multiple == 0.

        fairseq's `--padding-factor`: names already present are skipped (their count is kept), so
        padding GPT-2's dict.txt (which ends in madeupword0000..0002) to 51200 adds 0003..0938.
        """
        if multiple < 1:
            raise UserError(f"padding multiple must be a positive integer, got {multiple}")
        i = 0
        while len(self) % multiple != 0:
            self.add_symbol(f"madeupword{i:04d}", 0)
            i += 1
        return self

    # ---- lookups ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, symbol: str) -> bool:
        return symbol in self.indices

    def __getitem__(self, idx: int) -> str:
        return self.symbols[idx] if 0 <= idx < len(self.symbols) else SPECIALS[UNK]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dictionary) and self.symbols == other.symbols and self.counts == other.counts

    def index(self, symbol: str) -> int:
        """Index of `symbol`, or unk() when it is not in the dictionary."""
        return self.indices.get(symbol, UNK)

    def bos(self) -> int:
        return BOS

    def pad(self) -> int:
        return PAD

    def eos(self) -> int:
        return EOS

    def unk(self) -> int:
        return UNK

    # ---- encoding -----------------------------------------------------------------------

    def encode_line(self, line: str, append_eos: bool = True) -> np.ndarray:
        """int32 indices of the whitespace-separated words of `line` (+ `</s>`), unknown -> unk()."""
        get = self.indices.get
        ids = [get(word, UNK) for word in line.split()]
        if append_eos:
            ids.append(EOS)
        return np.array(ids, dtype=np.int32)

    def encode_lines(self, lines: Iterable[str], append_eos: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
        """Encode many lines at once: (flat int64 indices, int32 per-line sizes, words replaced by unk)."""
        get = self.indices.get
        flat: list[int] = []
        sizes: list[int] = []
        replaced = 0
        unk_symbol = SPECIALS[UNK]
        for line in lines:
            words = line.split()
            ids = list(map(get, words, itertools.repeat(UNK, len(words))))
            if UNK in ids:  # a literal "<unk>" in the text is not a replacement
                replaced += ids.count(UNK) - words.count(unk_symbol)
            if append_eos:
                ids.append(EOS)
            flat += ids
            sizes.append(len(ids))
        return np.array(flat, dtype=np.int64), np.array(sizes, dtype=np.int32), replaced

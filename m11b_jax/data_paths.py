"""Where the shared test data lives: `$M11B_DATA_DIR`, else `../shared/data` next to the repository.

The folder holds `gpt2_bpe/{encoder.json, vocab.bpe, dict.txt, dict.51200.txt}` and
`wikitext-103/{wiki.test.raw, wiki.test.tokens}` (see its README for their sources and hashes).
"""

from __future__ import annotations

import os
import pathlib

from .errors import UserError

REPO = pathlib.Path(__file__).resolve().parent.parent


def shared_data_dir() -> pathlib.Path:
    """The shared data folder; a UserError says how to point at it when it is missing."""
    path = pathlib.Path(os.environ.get("M11B_DATA_DIR") or REPO.parent / "shared" / "data")
    if not (path / "gpt2_bpe" / "encoder.json").is_file():
        raise UserError(
            f"shared data not found at {path}: set M11B_DATA_DIR to the folder holding gpt2_bpe/ and wikitext-103/"
        )
    return path


def gpt2_bpe_file(name: str) -> pathlib.Path:
    """`encoder.json`, `vocab.bpe`, `dict.txt` or `dict.51200.txt` from the shared data."""
    return shared_data_dir() / "gpt2_bpe" / name


def wikitext_file(name: str) -> pathlib.Path:
    """`wiki.test.raw` or `wiki.test.tokens` from the shared data."""
    return shared_data_dir() / "wikitext-103" / name

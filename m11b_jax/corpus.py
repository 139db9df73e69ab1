"""Offline default corpus: a small fairseq data-bin built from Python's own standard library.

`python -m m11b_jax.train` with no data must train on real text on a fresh machine with no
network and no test data. Every Python installation carries its standard library's `.py`
sources: code, comments and docstrings in English, a few MB of natural and formal text that
exercises a language model well enough to see the loss fall. `ensure_offline_corpus()` builds
from it, once, and caches:

* Text: the stdlib's `.py` files (not `site-packages`, not the `test`/`tests`/`idle_test`
  folders, which are mostly generated data), sorted by relative path; every third file is kept
  (about 4 MB with CPython 3.11). Each source line, tabs expanded, non-printable characters made
  spaces and trailing spaces removed, is one sequence; empty lines are dropped.
* Split: file k of that list goes to `valid` when k % 20 == 19 (5%), else to `train`.
* Tokens: a SentencePiece BPE model with 1024 pieces trained on the train split (about a
  second on one core; BPE training is deterministic, unigram's was ~10x slower). Its four
  control pieces are given fairseq's special ids (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3), so
  SentencePiece ids *are* the dictionary indices: the vocabulary is exactly 1024 including the
  specials (it fits the `tiny` model), `dict.txt` lists pieces 4..1023 with their training
  counts, and `sp.decode(model_ids)` needs no remapping. Normalization is off (indentation
  is kept as runs of '▁'); characters outside the model are `<unk>`.
* Output: `train`/`valid` `.bin`/`.idx` (fairseq mmap format, one `</s>` per line), `dict.txt`,
  `spm.model` and `manifest.json`, in `CACHE/<key>/`, where the key is the Python version, the
  SentencePiece version and a hash of the file list (relative paths and sizes).
  CACHE is `cache_dir`, else `$M11B_CACHE_DIR/offline_corpus`, else
  `~/.cache/m11b_jax/offline_corpus`.

The build writes into a temporary folder renamed into place at the end, so a killed build
leaves no half-made corpus (only a `.<key>.tmp-*` folder that a later build removes). A cached corpus
is found by one directory check.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import shutil
import sys
import sysconfig
import time

import numpy as np

from .dictionary import Dictionary
from .errors import UserError
from .indexed_dataset import MMapIndexedDatasetBuilder, dtype_for_vocab
from .textio import atomic_directory

VOCAB_SIZE = 1024
FILE_STRIDE = 3
VALID_EVERY = 20
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_FORMAT = 1  # bump when the recipe changes, so old caches are not reused


def stdlib_files(root: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """The corpus files: kept stdlib `.py` files in sorted relative-path order."""
    root = pathlib.Path(root or sysconfig.get_path("stdlib"))
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]
        found += [pathlib.Path(folder, f) for f in files if f.endswith(".py")]
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found[::FILE_STRIDE]


def default_cache_dir() -> pathlib.Path:
    if os.environ.get("M11B_CACHE_DIR"):
        return pathlib.Path(os.environ["M11B_CACHE_DIR"]) / "offline_corpus"
    return pathlib.Path.home() / ".cache" / "m11b_jax" / "offline_corpus"


def corpus_key(files: list[pathlib.Path], root: pathlib.Path) -> str:
    import sentencepiece

    recipe = (
        f"format {_FORMAT} stride {FILE_STRIDE} valid {VALID_EVERY} vocab {VOCAB_SIZE} spm {sentencepiece.__version__}"
    )
    h = hashlib.sha256(f"{recipe}\n".encode())
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()} {p.stat().st_size}\n".encode())
    return f"py{sys.version_info.major}.{sys.version_info.minor}-{h.hexdigest()[:16]}"


def ensure_offline_corpus(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Path of the cached data-bin (train/valid .bin/.idx, dict.txt, spm.model); built if missing."""
    root = pathlib.Path(sysconfig.get_path("stdlib"))
    files = stdlib_files(root)
    if len(files) < VALID_EVERY:
        raise UserError(
            f"found only {len(files)} standard-library .py files under {root}: this Python ships no sources; "
            "give a data-bin path instead of the offline corpus"
        )
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / corpus_key(files, root)
    if (final / "manifest.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache)
    # If another process finishes the same corpus first, its copy is kept and ours dropped.
    with atomic_directory(final, exist_ok=True) as tmp:
        _build(files, root, tmp)
    return final


def _remove_stale_temps(cache: pathlib.Path, age_s: float = 3600.0) -> None:
    """Delete `.<key>.tmp-*` folders of builds that died (older than `age_s`; a live build is seconds)."""
    for p in cache.glob(".*.tmp-*"):
        try:
            if time.time() - p.stat().st_mtime > age_s:
                shutil.rmtree(p, ignore_errors=True)
        except FileNotFoundError:
            pass


def _clean_line(line: str) -> str:
    line = line.expandtabs(4)
    if not line.isprintable():
        line = "".join(c if c.isprintable() else " " for c in line)
    return line.rstrip()


def _file_lines(path: pathlib.Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [line for line in map(_clean_line, text.splitlines()) if line]


def _build(files: list[pathlib.Path], root: pathlib.Path, out: pathlib.Path) -> None:
    import sentencepiece as spm

    splits: dict[str, list[str]] = {"train": [], "valid": []}
    for k, path in enumerate(files):
        splits["valid" if k % VALID_EVERY == VALID_EVERY - 1 else "train"] += _file_lines(path)

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(splits["train"]),
        model_writer=model,
        vocab_size=VOCAB_SIZE,
        model_type="bpe",
        bos_id=0,
        pad_id=1,
        eos_id=2,
        unk_id=3,
        bos_piece="<s>",
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    (out / "spm.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

    counts = np.zeros(VOCAB_SIZE, dtype=np.int64)
    stats = {}
    for split, lines in splits.items():
        ids = sp.encode(lines)
        sizes = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((t for x in ids for t in (*x, 2)), dtype=np.int64, count=int(sizes.sum()))
        if split == "train":
            counts += np.bincount(flat, minlength=VOCAB_SIZE)
        with MMapIndexedDatasetBuilder(out / split, dtype_for_vocab(VOCAB_SIZE)) as builder:
            builder.add_items(flat, sizes)
        stats[split] = {"sequences": len(sizes), "tokens": int(sizes.sum())}

    d = Dictionary()
    for i in range(d.nspecial, VOCAB_SIZE):
        d.add_symbol(sp.id_to_piece(i), int(counts[i]))
    d.save(out / "dict.txt")
    manifest = {
        "python": sys.version.split()[0],
        "stdlib": str(root),
        "sentencepiece": spm.__version__,
        "vocab_size": VOCAB_SIZE,
        "splits": stats,
        "files": [p.relative_to(root).as_posix() for p in files],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

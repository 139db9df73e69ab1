"""`python -m m11b_jax.wikitext103`: the Megatron-11b README's WikiText-103 test perplexity in one command.

    python -m m11b_jax.wikitext103 --path CKPT --data-dir D --bpe-dir B [--dict F] [--work-dir W]
        [--tokens-per-sample 1024] [--context-window 992] [--batch-size 8] [--dtype float32]
        [--model-parallel-size N] [--json] [--download]

D holds `wiki.test.raw` (WikiText-103 raw, for the model's input) and `wiki.test.tokens` (the tokenized
test set, for Megatron's original token count); B holds GPT-2's `encoder.json` and `vocab.bpe`. The
dictionary is --dict, else the checkpoint's own dict.txt, else B/dict.txt. The steps are the README's:

    1. detokenize wiki.test.raw             (m11b_jax.detok: Moses + the WikiText fixes)
    2. GPT-2 BPE, empty lines dropped       (m11b_jax.bpe)
    3. binarize with the dictionary         (m11b_jax.preprocess)
    4. eval_lm --context-window 992         (m11b_jax.eval_lm)
    5. normalized ppl = 2^(log2(ppl) * bpe_tokens / original_tokens), original tokens counted
       Megatron's way, len(text.strip().split(" ")) over wiki.test.tokens (245566 on the real file)

Intermediate files go to --work-dir (kept) or a temporary folder (removed). `--download` first fetches
the missing inputs from their official addresses into D and B and checks their checksums; it needs a
network, and without one it stops with an error saying what to fetch by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from typing import Sequence

from m11b_jax import eval_lm
from m11b_jax.errors import UserError, cli_main

RAW, TOKENS = "wiki.test.raw", "wiki.test.tokens"
ENCODER, VOCAB = "encoder.json", "vocab.bpe"

# Official sources (fairseq's examples/megatron_11b/README.md; Salesforce's WikiText release) and checksums.
# sha256 of the files, as ../shared/data/README.md lists them. WikiText-103's raw test split is the same
# file as WikiText-2's; the archives themselves carry no published sha256, so the extracted files are checked.
WIKITEXT_RAW_ZIP = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip"
WIKITEXT_TOKENS_ZIP = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"
WIKITEXT_TOKENS_ZIP_MD5 = "9ddaacaf6af0710eda8c456decff7832"  # as pinned by torchtext's WikiText103 loader
GPT2_BPE_URL = "https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/"
SHA256 = {
    RAW: "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    ENCODER: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    VOCAB: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


# ---- the pipeline --------------------------------------------------------------------------------


def require_inputs(data_dir: pathlib.Path, bpe_dir: pathlib.Path) -> None:
    missing = [str(p) for p in (data_dir / RAW, data_dir / TOKENS, bpe_dir / ENCODER, bpe_dir / VOCAB)
               if not p.is_file()]
    if missing:
        raise UserError(f"missing input file(s): {', '.join(missing)}: pass --data-dir/--bpe-dir folders holding "
                        "them, or add --download to fetch them")


def choose_dictionary(dict_arg, ckpt, bpe_dir: pathlib.Path) -> pathlib.Path:
    """--dict, else the checkpoint's dict.txt, else the BPE folder's dict.txt."""
    from m11b_jax import params_io

    if dict_arg is not None:
        path = pathlib.Path(dict_arg)
        if not path.is_file():
            raise UserError(f"--dict {path} not found: give the checkpoint's dict.txt")
        return path
    in_ckpt = params_io.dictionary_path(ckpt) if pathlib.Path(ckpt).is_dir() else None
    if in_ckpt is not None:
        return in_ckpt
    if (bpe_dir / "dict.txt").is_file():
        return bpe_dir / "dict.txt"
    raise UserError(f"no dictionary: the checkpoint {ckpt} has no dict.txt and neither does {bpe_dir}: pass --dict")


def prepare_data_bin(data_dir: pathlib.Path, bpe_dir: pathlib.Path, dict_path: pathlib.Path, work: pathlib.Path,
                     workers: int = 1, log=None) -> pathlib.Path:
    """Steps 1-3: wiki.test.raw -> detok -> BPE -> WORK/data-bin/test.{bin,idx} + dict.txt."""
    from m11b_jax.bpe import encode_files
    from m11b_jax.detok import detokenize_line
    from m11b_jax.dictionary import Dictionary
    from m11b_jax.preprocess import binarize_file
    from m11b_jax.textio import atomic_output, iter_lines

    detok, bpe = work / "wiki.test.detok", work / "wiki.test.bpe"
    data_bin = work / "data-bin"
    t0 = time.perf_counter()
    with atomic_output(detok) as out:
        for line in iter_lines(data_dir / RAW):
            out.write(detokenize_line(line) + "\n")
    stats = encode_files(str(bpe_dir / ENCODER), str(bpe_dir / VOCAB), [str(detok)], [str(bpe)], workers=workers)
    dictionary = Dictionary.load(dict_path)
    data_bin.mkdir(exist_ok=True)
    binarized = binarize_file(str(bpe), dictionary, str(data_bin / "test"))
    dictionary.save(data_bin / "dict.txt")
    if log is not None:
        log(f"detok + BPE + binarize: {stats['lines']} lines, {binarized['tokens']} tokens "
            f"({binarized['replaced']} replaced by <unk>) in {time.perf_counter() - t0:.1f}s -> {data_bin}")
    return data_bin


def table(summary: dict, settings: str) -> str:
    """The README's figures: unnormalized ppl, normalized ppl, BPE tokens / original tokens."""
    return "\n".join([
        f"WikiText-103 test ({settings})",
        "| unnormalized ppl | normalized ppl | tokens (BPE / original) |",
        "|---:|---:|---:|",
        f"| {summary['ppl']:.2f} | {summary['normalized_ppl']:.2f} | "
        f"{summary['ntokens']} / {summary['orig_token_count']} |",
    ])


# ---- --download ----------------------------------------------------------------------------------


def sha256_of(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: pathlib.Path, md5: str | None = None, log=None) -> pathlib.Path:
    """Download `url` to `dest` (through a temporary file; an optional md5 is checked before the rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if log is not None:
        log(f"downloading {url}")
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
        if md5 is not None and digest.hexdigest() != md5:
            raise UserError(f"{url} has md5 {digest.hexdigest()}, expected {md5}: the download is damaged or the "
                            "file changed; fetch it by hand and pass --data-dir")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download {url} ({reason}): no network? fetch it by hand, unpack it and pass "
                        "--data-dir/--bpe-dir") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return dest


def extract_member(archive: pathlib.Path, name: str, dest: pathlib.Path) -> None:
    """Copy the archive member whose file name is `name` to `dest` (via a temporary file)."""
    from m11b_jax.textio import atomic_output

    with zipfile.ZipFile(archive) as z:
        members = [m for m in z.namelist() if m.rsplit("/", 1)[-1] == name]
        if not members:
            raise UserError(f"{archive} holds no {name}: is it the right archive?")
        with z.open(members[0]) as src, atomic_output(dest, "wb") as out:
            shutil.copyfileobj(src, out)


def check_sha256(path: pathlib.Path, expected: str) -> None:
    got = sha256_of(path)
    if got != expected:
        path.unlink()
        raise UserError(f"{path} has sha256 {got}, expected {expected}: the download is damaged or not the "
                        "official file; fetch it by hand")


def download(data_dir: pathlib.Path, bpe_dir: pathlib.Path, log=None) -> None:
    """Fetch whatever of wiki.test.raw, wiki.test.tokens, encoder.json, vocab.bpe is missing; verify it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    bpe_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=data_dir) as tmp:
        tmp = pathlib.Path(tmp)
        if not (data_dir / RAW).is_file():
            extract_member(fetch(WIKITEXT_RAW_ZIP, tmp / "raw.zip", log=log), RAW, data_dir / RAW)
        check_sha256(data_dir / RAW, SHA256[RAW])
        if not (data_dir / TOKENS).is_file():
            archive = fetch(WIKITEXT_TOKENS_ZIP, tmp / "tokens.zip", md5=WIKITEXT_TOKENS_ZIP_MD5, log=log)
            extract_member(archive, TOKENS, data_dir / TOKENS)
    for name in (ENCODER, VOCAB):
        if not (bpe_dir / name).is_file():
            fetch(GPT2_BPE_URL + name, bpe_dir / name, log=log)
        check_sha256(bpe_dir / name, SHA256[name])


# ---- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m m11b_jax.wikitext103", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="m11b_jax params checkpoint (python -m m11b_jax.convert)")
    p.add_argument("--data-dir", required=True, help=f"folder with {RAW} and {TOKENS}")
    p.add_argument("--bpe-dir", required=True, help=f"folder with GPT-2's {ENCODER} and {VOCAB}")
    p.add_argument("--dict", help="dictionary to binarize with (default: the checkpoint's dict.txt)")
    p.add_argument("--work-dir", help="keep the detokenized, BPE and binarized files here (default: temporary)")
    p.add_argument("--workers", type=int, default=1, help="processes for the BPE step")
    p.add_argument("--orig-token-count", type=int,
                   help=f"original token count (default: counted from {TOKENS})")
    eval_lm.add_eval_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--download", action="store_true", help="fetch missing inputs from their official addresses")
    return p


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    from m11b_jax.detok import original_token_count

    args = build_parser().parse_args(argv)
    data_dir, bpe_dir = pathlib.Path(args.data_dir), pathlib.Path(args.bpe_dir)
    if args.download:
        download(data_dir, bpe_dir, log=_stderr)
    require_inputs(data_dir, bpe_dir)
    # Cheap checks before the text pipeline runs.
    eval_lm.ContextWindows(1, args.tokens_per_sample, args.context_window)
    if not pathlib.Path(args.path).exists():
        raise UserError(f"checkpoint not found: {args.path} (give the directory written by python -m m11b_jax.convert)")
    dict_path = choose_dictionary(args.dict, args.path, bpe_dir)
    from m11b_jax.dictionary import Dictionary

    vocab, stored = eval_lm.checkpoint_vocabulary(args.path)  # before the minutes of BPE, not after
    eval_lm.check_dictionary_fits(Dictionary.load(dict_path), vocab, stored, f"--dict {dict_path}")
    orig = args.orig_token_count if args.orig_token_count is not None else original_token_count(data_dir / TOKENS)
    log = None if args.json else _stderr
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            work = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wikitext103-")))
        else:
            work = pathlib.Path(args.work_dir)
            work.mkdir(parents=True, exist_ok=True)
        data_bin = prepare_data_bin(data_dir, bpe_dir, dict_path, work, workers=args.workers, log=log)
        summary, _ = eval_lm.run_eval(
            data_bin, args.path, split="test", tokens_per_sample=args.tokens_per_sample,
            context_window=args.context_window, batch_size=args.batch_size,
            model_parallel_size=args.model_parallel_size, dtype=args.dtype, attention_chunk=args.attention_chunk,
            passes=args.passes, orig_token_count=orig, log=log)
    if args.json:
        print(json.dumps(summary))
        return
    settings = (f"--tokens-per-sample {args.tokens_per_sample} --context-window {args.context_window}, "
                f"{args.dtype}, {summary['tokens_per_s']:.0f} tokens/s")
    print(table(summary, settings))


if __name__ == "__main__":
    main()

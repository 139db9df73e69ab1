"""Cross-check the text pipeline against fairseq's own code: detok, BPE and binarized files byte for byte.

Not a test (it needs fairseq, which the project does not depend on). Get fairseq's wheel without
installing it (its pure-Python files are all that is run; torch comes from the test extra):

    .venv/bin/pip download fairseq==0.12.2 --no-deps --only-binary :all: \\
        --python-version 3.8 --platform manylinux1_x86_64 -d /tmp/fairseq-wheel
    .venv/bin/python benchmarks/check_fairseq_parity.py /tmp/fairseq-wheel/fairseq-0.12.2-*.whl

It runs fairseq's `examples/megatron_11b/detok.py`, `examples/roberta/multiprocessing_bpe_encoder.py`
and `FileBinarizer` (what `fairseq-preprocess --only-source` calls) on wiki.test.raw, and on an
adversarial text (random Unicode, control characters, odd whitespace, CR/CRLF line ends), and
binarizes that text's raw words (mostly unknown) too; then runs our CLIs on the same inputs and
compares every output file.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import zipfile

REPO = pathlib.Path(__file__).resolve().parent.parent
FAIRSEQ_FILES = [
    "fairseq/data/encoders/gpt2_bpe_utils.py",
    "fairseq/examples/megatron_11b/detok.py",
    "fairseq/examples/roberta/multiprocessing_bpe_encoder.py",
    "fairseq/data/indexed_dataset.py",
    "fairseq/data/dictionary.py",
    "fairseq/binarizer.py",
    "fairseq/file_chunker_utils.py",
    "fairseq/tokenizer.py",
]

# Runs one fairseq script or the binarizer with the few fairseq modules it imports loaded from the
# extracted files and the rest (heavy, unrelated) replaced by stubs.
RUNNER = r"""
import importlib.util, os, runpy, sys, types
SRC = sys.argv[1]

def stub(name, **attrs):
    m = types.ModuleType(name); m.__path__ = []; m.__dict__.update(attrs); sys.modules[name] = m; return m

def load(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SRC, rel))
    m = importlib.util.module_from_spec(spec); sys.modules[name] = m; spec.loader.exec_module(m); return m

class PathManager:
    get_local_path = staticmethod(lambda p: p)
    exists = staticmethod(os.path.exists)
    open = staticmethod(open)
    mkdirs = staticmethod(lambda p: os.makedirs(p, exist_ok=True))

import torch
stub("fairseq"); stub("fairseq.file_io", PathManager=PathManager); stub("fairseq.dataclass")
stub("fairseq.dataclass.constants", DATASET_IMPL_CHOICES=["mmap"])
stub("fairseq.data.fasta_dataset", FastaDataset=object)
stub("fairseq.data.huffman", HuffmanMMapIndexedDataset=object,
     HuffmanMMapIndex=type("H", (), {"_HDR_MAGIC": b"HUFFIDX\x00\x00"}))
data = stub("fairseq.data", FairseqDataset=torch.utils.data.Dataset)
stub("fairseq.utils", item=lambda x: x); stub("fairseq.data.data_utils", post_process=lambda s, b: s)
stub("fairseq.data.encoders")
utils = load("fairseq.data.encoders.gpt2_bpe_utils", "fairseq/data/encoders/gpt2_bpe_utils.py")
stub("fairseq.data.encoders.gpt2_bpe", get_encoder=utils.get_encoder)
load("fairseq.tokenizer", "fairseq/tokenizer.py"); load("fairseq.file_chunker_utils", "fairseq/file_chunker_utils.py")
data.indexed_dataset = load("fairseq.data.indexed_dataset", "fairseq/data/indexed_dataset.py")
dictionary = load("fairseq.data.dictionary", "fairseq/data/dictionary.py"); data.Dictionary = dictionary.Dictionary
binarizer = load("fairseq.binarizer", "fairseq/binarizer.py")

if sys.argv[2] == "binarize":
    inp, dict_path, prefix = sys.argv[3:6]
    vocab = dictionary.Dictionary.load(dict_path)
    binarizer.FileBinarizer.multiprocess_dataset(
        inp, "mmap", binarizer.VocabularyDatasetBinarizer(vocab, append_eos=True), prefix,
        vocab_size=len(vocab), num_workers=1)
else:
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def adversarial_text(seed: int = 7) -> str:
    rng = random.Random(seed)
    pools = [
        "abcXYZ ",
        "0123 ",
        "'sltdmvre ",
        " \t\x0b\x0c\x1c\x85\u2028\xa0\u3000",
        "éàüß ",
        "😀🇫🇷\u200d👍🏽 ",
        "\u0301\u0308",
        "!?.,;:-—\"'",
        "日本語한국어",
        "\u0378\u0c5c\U000e0080\ue000",
        "\x00\x01\x7f",
    ]
    lines = []
    for _ in range(3000):
        chars = "".join(rng.choice(pools) for _ in range(3))
        lines.append("".join(rng.choice(chars) for _ in range(rng.randrange(0, 80))) + rng.choice(["\n", "\r\n", "\r"]))
    return "".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("wheel", help="fairseq wheel (see the module docstring)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = p.parse_args()
    data = pathlib.Path(args.data_dir)
    enc, voc, dict_txt = (data / "gpt2_bpe" / n for n in ("encoder.json", "vocab.bpe", "dict.txt"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        src = tmp / "fairseq_src"
        with zipfile.ZipFile(args.wheel) as z:
            for name in FAIRSEQ_FILES:
                z.extract(name, src)
        (tmp / "runner.py").write_text(RUNNER)

        def fairseq(*argv, stdout=None):
            subprocess.run(
                [sys.executable, str(tmp / "runner.py"), str(src), *map(str, argv)],
                check=True,
                stdout=stdout,
                stderr=subprocess.DEVNULL,
            )

        def ours(module, *argv, stdout=subprocess.DEVNULL):
            subprocess.run(
                [sys.executable, "-m", f"m11b_jax.{module}", *map(str, argv)],
                check=True,
                env=env,
                stdout=stdout,
                stderr=subprocess.DEVNULL,
            )

        (tmp / "adv.txt").write_bytes(adversarial_text().encode("utf-8"))
        inputs = {"wiki": data / "wikitext-103" / "wiki.test.raw", "adversarial": tmp / "adv.txt"}
        ok = True
        for name, raw in inputs.items():
            outs = {}
            for who in ("fairseq", "ours"):
                d = tmp / f"{who}-{name}"
                d.mkdir()
                with open(d / "detok", "wb") as f:
                    if who == "fairseq":
                        fairseq(src / "fairseq/examples/megatron_11b/detok.py", raw, stdout=f)
                    else:
                        ours("detok", raw, stdout=f)
                bpe_args = ["--encoder-json", enc, "--vocab-bpe", voc, "--inputs", d / "detok", "--outputs", d / "bpe"]
                if who == "fairseq":
                    fairseq(src / "fairseq/examples/roberta/multiprocessing_bpe_encoder.py", *bpe_args, "--workers", 1)
                    fairseq("binarize", d / "bpe", dict_txt, d / "test")
                else:
                    ours("bpe", *bpe_args)
                    ours("preprocess", "--only-source", "--testpref", d / "bpe", "--srcdict", dict_txt, "--destdir", d)
                outs[who] = {f: (d / f).read_bytes() for f in ("detok", "bpe", "test.bin", "test.idx")}
            for f, content in outs["fairseq"].items():
                same = content == outs["ours"][f]
                ok &= same
                print(f"{name:12s} {f:9s} {len(content):9d} bytes  {'identical' if same else 'DIFFERENT'}")
        # Binarizing raw words directly: whitespace splitting, <unk>, CR/CRLF line ends in the binarizer.
        for who in ("fairseq", "ours"):
            d = tmp / f"{who}-words"
            d.mkdir()
            if who == "fairseq":
                fairseq("binarize", tmp / "adv.txt", dict_txt, d / "test")
            else:
                ours(
                    "preprocess", "--only-source", "--testpref", tmp / "adv.txt", "--srcdict", dict_txt, "--destdir", d
                )
        for f in ("test.bin", "test.idx"):
            content = (tmp / "fairseq-words" / f).read_bytes()
            same = content == (tmp / "ours-words" / f).read_bytes()
            ok &= same
            print(f"{'raw words':12s} {f:9s} {len(content):9d} bytes  {'identical' if same else 'DIFFERENT'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""The data CLIs (bpe, detok, preprocess): fairseq semantics and one clear error per bad input."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from m11b_jax import bpe as bpe_cli
from m11b_jax import detok as detok_cli
from m11b_jax import preprocess as preprocess_cli
from m11b_jax.detok import detokenize_line
from m11b_jax.indexed_dataset import MMapIndexedDataset
from m11b_jax.tokenizer import GPT2BPE

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_module(module: str, *args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", f"m11b_jax.{module}", *map(str, args)], input=stdin, capture_output=True, env=env
    )


def expect_user_error(capsys, main, argv, match: str) -> str:
    """`main(argv)` must exit 2 with a single `error: ...` line on stderr containing `match`."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert match in err, err
    return err


@pytest.fixture(scope="module")
def gpt2(shared_data):
    d = shared_data / "gpt2_bpe"
    return {
        "encoder": d / "encoder.json",
        "vocab": d / "vocab.bpe",
        "dict": d / "dict.txt",
        "bpe": GPT2BPE.from_files(d / "encoder.json", d / "vocab.bpe"),
    }


def bpe_args(gpt2, *rest):
    return [str(a) for a in ("--encoder-json", gpt2["encoder"], "--vocab-bpe", gpt2["vocab"], *rest)]


# ---- bpe ------------------------------------------------------------------------------------


def test_bpe_strips_and_drops_empty_lines(tmp_path, gpt2):
    src = tmp_path / "in.txt"
    src.write_text("  Hello world \n\n   \nIt's\r\nlast", encoding="utf-8")
    bpe_cli.main(bpe_args(gpt2, "--inputs", src, "--outputs", tmp_path / "out.txt"))
    enc = gpt2["bpe"].encode
    want = [enc("Hello world"), enc("It's"), enc("last")]
    assert (tmp_path / "out.txt").read_text() == "".join(" ".join(map(str, ids)) + "\n" for ids in want)
    bpe_cli.main(bpe_args(gpt2, "--inputs", src, "--outputs", tmp_path / "keep.txt", "--keep-empty"))
    assert (tmp_path / "keep.txt").read_text().split("\n")[1:3] == ["", ""]


def test_bpe_several_inputs_drop_rows_together(tmp_path, gpt2):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one\ntwo\nthree\n")
    b.write_text("uno\n\ntres\n")
    bpe_cli.main(bpe_args(gpt2, "--inputs", a, b, "--outputs", tmp_path / "a.bpe", tmp_path / "b.bpe"))
    enc = gpt2["bpe"].encode
    assert (tmp_path / "a.bpe").read_text().splitlines() == [" ".join(map(str, enc(w))) for w in ("one", "three")]
    assert (tmp_path / "b.bpe").read_text().splitlines() == [" ".join(map(str, enc(w))) for w in ("uno", "tres")]


def test_bpe_workers_and_stdio(tmp_path, gpt2):
    lines = [f"line {i}: naïve café — {i * 7919} 🚀" if i % 13 else "" for i in range(2500)]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    bpe_cli.main(bpe_args(gpt2, "--inputs", src, "--outputs", tmp_path / "one.txt"))
    two = run_module("bpe", *bpe_args(gpt2, "--inputs", "-", "--outputs", "-", "--workers", 2), stdin=src.read_bytes())
    assert two.returncode == 0, two.stderr
    assert two.stdout == (tmp_path / "one.txt").read_bytes()
    assert len(two.stdout.splitlines()) == sum(1 for line in lines if line)


def test_bpe_bad_inputs(tmp_path, gpt2, capsys):
    good = tmp_path / "good.txt"
    good.write_text("a\nb\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nlatin-1 caf\xe9\n")
    out = tmp_path / "out.txt"
    expect_user_error(
        capsys, bpe_cli.main, bpe_args(gpt2, "--inputs", bad, "--outputs", out), "bad.txt line 3 is not UTF-8"
    )
    assert sorted(os.listdir(tmp_path)) == ["bad.txt", "good.txt"]  # no output, no temporary file
    expect_user_error(
        capsys, bpe_cli.main, bpe_args(gpt2, "--inputs", good, good, "--outputs", out), "2 --inputs but 1 --outputs"
    )
    short = tmp_path / "short.txt"
    short.write_text("a\n")
    expect_user_error(
        capsys,
        bpe_cli.main,
        bpe_args(gpt2, "--inputs", good, short, "--outputs", out, tmp_path / "o2"),
        "different numbers of lines",
    )
    expect_user_error(
        capsys,
        bpe_cli.main,
        ["--encoder-json", tmp_path / "missing.json", "--vocab-bpe", gpt2["vocab"], "--inputs", good, "--outputs", out],
        "encoder.json not found",
    )
    expect_user_error(
        capsys, bpe_cli.main, bpe_args(gpt2, "--inputs", tmp_path / "nope", "--outputs", out), "input file not found"
    )
    assert not out.exists()


def test_bpe_bad_input_with_workers_is_one_line(tmp_path, gpt2):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n" * 2500 + b"\xff\n")
    r = run_module("bpe", *bpe_args(gpt2, "--inputs", bad, "--outputs", tmp_path / "o.txt", "--workers", 2))
    assert r.returncode == 2
    assert r.stderr.decode().strip() == (
        f"error: {bad} line 2501 is not UTF-8 (byte 0 of the line is 0xff): convert the file to UTF-8, e.g. with iconv"
    )
    assert not (tmp_path / "o.txt").exists()


# ---- detok ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, want",
    [
        (" = Robert Boulter = \n", "=Robert Boulter="),
        (" = = Career = = ", "==Career=="),
        (
            " The 2 @,@ 000 @-@ year @-@ old house , built in 1990 – 1991 . ",
            "The 2,000-year-old house, built in 1990–1991.",
        ),
        (" ( born 1 January ) ", "(born 1 January)"),
        ("", ""),
    ],
)
def test_detokenize_line(line, want):
    assert detokenize_line(line) == want


def test_detok_cli(tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(" = A = \n\n")
    b.write_text(" x , y . \n")
    detok_cli.main([str(a), str(b), "--output", str(tmp_path / "out.txt")])
    assert (tmp_path / "out.txt").read_text() == "=A=\n\nx, y.\n"
    b.write_bytes(b"ok\n\xc3\x28\n")
    expect_user_error(capsys, detok_cli.main, [a, b, "--output", tmp_path / "out2.txt"], "b.txt line 2 is not UTF-8")
    assert not (tmp_path / "out2.txt").exists()


# ---- preprocess -----------------------------------------------------------------------------


@pytest.fixture
def small_dict(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("10 5\n20 4\n30 3\n")
    return path


def test_preprocess_splits_and_summary(tmp_path, small_dict, capsys):
    for name, text in {"tr": "10 20\n30 99\n\n", "va": "20\n", "va2": "10 10 10\n", "te": "30 30\n"}.items():
        (tmp_path / name).write_text(text)
    dest = tmp_path / "bin"
    preprocess_cli.main(
        [
            "--only-source",
            "--trainpref",
            str(tmp_path / "tr"),
            "--validpref",
            f"{tmp_path / 'va'},{tmp_path / 'va2'}",
            "--testpref",
            str(tmp_path / "te"),
            "--srcdict",
            str(small_dict),
            "--destdir",
            str(dest),
        ]
    )
    out = capsys.readouterr().out
    assert "train: " in out and "3 sents, 7 tokens, 14.3% replaced by <unk>" in out
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["dict.txt"] + [f"{s}.{e}" for s in ("train", "valid", "valid1", "test") for e in ("bin", "idx")]
    )
    train = MMapIndexedDataset(dest / "train")
    assert [train[i].tolist() for i in range(3)] == [[4, 5, 2], [6, 3, 2], [2]]
    assert MMapIndexedDataset(dest / "valid1")[0].tolist() == [4, 4, 4, 2]


def test_preprocess_workers_give_identical_files(tmp_path, small_dict):
    rng = np.random.default_rng(0)
    text = "".join(
        " ".join(str(x) for x in rng.choice([10, 20, 30, 40], rng.integers(0, 20))) + "\n" for _ in range(5000)
    )
    (tmp_path / "big").write_text(text)
    outs = []
    for workers in (1, 2):
        dest = tmp_path / f"w{workers}"
        r = run_module(
            "preprocess",
            "--only-source",
            "--trainpref",
            tmp_path / "big",
            "--srcdict",
            small_dict,
            "--destdir",
            dest,
            "--workers",
            workers,
        )
        assert r.returncode == 0, r.stderr
        outs.append([(dest / f"train.{e}").read_bytes() for e in ("bin", "idx")])
    assert outs[0] == outs[1]
    assert len(MMapIndexedDataset(tmp_path / "w1" / "train")) == 5000


def test_preprocess_bad_inputs(tmp_path, small_dict, capsys):
    good = tmp_path / "good.txt"
    good.write_text("10\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    dest = tmp_path / "bin"
    base = ["--srcdict", small_dict, "--destdir", dest]
    expect_user_error(capsys, preprocess_cli.main, ["--trainpref", good, *base], "pass --only-source")
    expect_user_error(capsys, preprocess_cli.main, ["--only-source", *base], "nothing to binarize")
    expect_user_error(capsys, preprocess_cli.main, ["--only-source", "--trainpref", empty, *base], "empty.txt is empty")
    expect_user_error(
        capsys, preprocess_cli.main, ["--only-source", "--trainpref", tmp_path / "nope", *base], "input file not found"
    )
    expect_user_error(
        capsys,
        preprocess_cli.main,
        ["--only-source", "--trainpref", good, "--srcdict", tmp_path / "no.txt", "--destdir", dest],
        "dictionary not found",
    )
    bad_dict = tmp_path / "bad_dict.txt"
    bad_dict.write_text("10 5\n20\n")
    expect_user_error(
        capsys,
        preprocess_cli.main,
        ["--only-source", "--trainpref", good, "--srcdict", bad_dict, "--destdir", dest],
        "bad_dict.txt line 2: expected '<symbol> <count>'",
    )
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"10\n20\n\x80\n")
    expect_user_error(
        capsys, preprocess_cli.main, ["--only-source", "--trainpref", bad, *base], "bad.txt line 3 is not UTF-8"
    )
    assert not dest.exists() or [p.name for p in dest.iterdir()] == []


def test_preprocess_bad_line_number_with_workers(tmp_path, small_dict):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"10 20\n" * 3000 + b"30 \xc0\n" + b"10\n" * 100)
    r = run_module(
        "preprocess",
        "--only-source",
        "--trainpref",
        bad,
        "--srcdict",
        small_dict,
        "--destdir",
        tmp_path / "bin",
        "--workers",
        2,
    )
    assert r.returncode == 2
    assert "bad.txt line 3001 is not UTF-8" in r.stderr.decode()
    assert r.stderr.decode().count("\n") == 1
    assert list((tmp_path / "bin").iterdir()) == []

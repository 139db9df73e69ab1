"""The Python API (LanguageModel), `python -m m11b_jax.generate`, the README example, checkpoints with BPE."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from m11b_jax import LanguageModel
from m11b_jax import param_tree, sharding
from m11b_jax.config import load_config
from m11b_jax.errors import UserError
from m11b_jax.generate import main
from m11b_jax.generation import SearchOptions
from m11b_jax.params_io import save_params

from conftest import REPO

CFG = load_config("tiny", dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, shared_data):
    """A tiny random model saved twice: with dict.txt + GPT-2 BPE files (as convert --bpe-dir writes), and bare.
    Its dictionary is the first 1020 symbols of the release's dict.txt (+ 4 specials = 1024 rows)."""
    root = tmp_path_factory.mktemp("gen")
    lines = (shared_data / "gpt2_bpe" / "dict.txt").read_text().splitlines()[: CFG.vocab_size - 4]
    (root / "dict.txt").write_text("\n".join(lines) + "\n")
    params = param_tree.init_params(CFG, sharding.make_mesh(1), sharding.logical_rules(), seed=3)
    full = save_params(params, root / "ckpt", CFG, dictionary_path=root / "dict.txt",
                       bpe_dir=shared_data / "gpt2_bpe")
    bare = save_params(params, root / "bare", CFG)
    return {"root": root, "full": full, "bare": bare, "bpe": shared_data / "gpt2_bpe"}


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its LanguageModel example"
    return m.group(1)


def test_readme_example_runs(ckpts, monkeypatch, capsys):
    """The README's example, exactly as written, run next to a checkpoint folder named ckpt."""
    monkeypatch.chdir(ckpts["root"])
    exec(compile(_readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert len(out) >= 2 and float(out[-1]) < 0


def test_api_encode_decode_score_generate(ckpts):
    from m11b_jax.eval_lm import ContextWindows, evaluate

    lm = LanguageModel.load(ckpts["full"], model_parallel_size=2)
    ids = lm.encode(" the of and")
    assert ids[0] == 2 and 3 not in ids and lm.decode(ids) == " the of and"
    s = lm.score(" the of and to")
    assert s["tokens"] == lm.encode(" the of and to")[1:] + [2]
    # eval_lm's numbers: the same tokens as a one-line split, one window
    stream = np.asarray(s["tokens"], np.int32)
    res = evaluate(lm.params, lm.cfg, stream, ContextWindows(len(stream), 32, 0), lm.mesh, lm.rules, batch_size=1)
    np.testing.assert_allclose(s["logprobs"], res.token_logprobs, atol=1e-5)
    assert abs(s["total"] - float(np.sum(res.token_logprobs))) < 1e-4
    out = lm.generate([" the", [2, 5, 6]], max_new_tokens=5, return_ids=True)
    assert out[1].prompt_ids == [2, 5, 6] and out[0].prompt_ids == lm.encode(" the")
    assert out == lm.generator.generate([lm.encode(" the"), [2, 5, 6]], SearchOptions(max_new_tokens=5))
    assert isinstance(lm.generate(" the", max_new_tokens=3), str)


def _run(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    main(argv)
    return capsys.readouterr().out


def test_cli_json_in_input_order(ckpts, capsys, monkeypatch, tmp_path):
    lm = LanguageModel.load(ckpts["full"], model_parallel_size=8)
    prompts = [[2, 7, 9, 11], [2, 40], [2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    want = lm.generate(prompts, max_new_tokens=6, beam=2, return_ids=True)
    f = tmp_path / "p.txt"
    f.write_text("".join(" ".join(map(str, p)) + "\n" for p in prompts))
    out = _run(["--path", str(ckpts["full"]), "--input", str(f), "--prompt-ids", "--json", "--beam", "2",
                "--max-new-tokens", "6", "--batch-size", "2"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt_ids"] for r in rows] == prompts
    assert [r["tokens"] for r in rows] == [w.tokens for w in want]
    assert all(isinstance(r["text"], str) for r in rows)
    np.testing.assert_allclose([r["logprob"] for r in rows], [w.logprob for w in want], atol=1e-4)
    text = _run(["--path", str(ckpts["full"]), "--max-new-tokens", "4", "--sampling", "--top-k", "5"], capsys,
                stdin="Hello\nThe cat\n", monkeypatch=monkeypatch)
    assert len(text.splitlines()) == 2


@pytest.mark.parametrize("argv, stdin, message", [
    (["--prompt-ids"], "2 5000\n", "outside the vocabulary"),
    (["--prompt-ids"], "2 5\n\n", "empty"),
    (["--prompt-ids", "--max-new-tokens", "120"], "2 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 "
                                                 "29 30\n", "positions"),
    (["--beam", "2", "--sampling"], "hi\n", "--sampling"),
    (["--bare"], "hello\n", "--bpe-dir"),
])
def test_cli_bad_input_is_one_line(ckpts, argv, stdin, message):
    path = ckpts["bare"] if "--bare" in argv else ckpts["full"]
    argv = [a for a in argv if a != "--bare"]
    proc = subprocess.run([sys.executable, "-m", "m11b_jax.generate", "--path", str(path), *argv], input=stdin,
                          capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ,
                                                                           "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in proc.stderr


def test_bpe_dir_errors_and_bare_checkpoint(ckpts, tmp_path):
    with pytest.raises(UserError, match="encoder.json"):
        save_params({}, tmp_path / "x", CFG, dtype="float32", bpe_dir=tmp_path)
    lm = LanguageModel.load(ckpts["bare"], model_parallel_size=1, bpe_dir=ckpts["bpe"])
    with pytest.raises(UserError, match="dict.txt"):
        lm.encode("hello")
    assert lm.generate([[2, 5]], max_new_tokens=2, return_ids=True)[0].prompt_ids == [2, 5]

"""`convert --to-hf / --from-hf`: our checkpoints as transformers' XGLMForCausalLM + a fast tokenizer, and back.

The export is loaded with transformers' Auto classes (no custom code) and compared with our model: logits to
1e-5 (right padding, left padding with the position ids `generate` derives, an in-stream `</s>`), greedy
`generate` against our greedy continuation, the tokenizer's ids against our BPE + dictionary on all of
wiki.test.raw; then the way back, training checkpoints, and the refusals.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import fairseq_fixtures as ff
from m11b_jax import hf, params_io
from m11b_jax.config import load_config
from m11b_jax.convert import convert_fairseq, export_fairseq, main as convert_main
from m11b_jax.dictionary import Dictionary
from m11b_jax.fairseq_io import load_shard
from m11b_jax.fairseq_layout import get_path, to_fairseq_state_dict
from m11b_jax.generation import Generator, SearchOptions
from m11b_jax.model import TransformerLM
from m11b_jax.sharding import logical_rules, make_mesh
from m11b_jax.tokenizer import GPT2BPE

REPO = pathlib.Path(__file__).resolve().parent.parent
PAD, EOS = 1, 2
CFG = load_config("tiny", dropout=0.0, attention_dropout=0.0, vocab_size=256, d_model=64, ffn_dim=128, num_heads=4,
                  max_positions=64)


def quiet(msg):
    pass


def random_params(cfg, seed=0):
    """Random weights everywhere (LayerNorms and biases too), as host numpy arrays."""
    from m11b_jax.param_tree import init_params

    params = jax.device_get(init_params(cfg, make_mesh(1, jax.devices()[:1]), logical_rules(), seed=seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), params)


def write_params(path, params, cfg, dict_file=None, dtype="float32"):
    with params_io.ParamsWriter(path, cfg, dict_file, dtype=dtype) as w:
        for leaf in w.specs:
            w.write(leaf, (), get_path(params, leaf))
    return path


def read_all(path):
    reader = params_io.ParamsReader(path)
    return {leaf: reader.read(leaf) for leaf in reader.leaves}


def leftovers(path: pathlib.Path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    ff.write_dict(root / "dict.txt", CFG.vocab_size - 4)
    params = random_params(CFG)
    return params, write_params(root / "ckpt", params, CFG, root / "dict.txt")


def our_logits(cfg, params, tokens):
    return np.asarray(jax.jit(lambda p, t: TransformerLM(cfg).apply({"params": p}, t))(params, jnp.asarray(tokens)))


def padded_batch(vocab, seed=1, t=24):
    rng = np.random.default_rng(seed)
    tok = rng.integers(4, vocab, size=(4, t)).astype(np.int32)
    tok[0, 17:] = PAD  # right padding
    tok[1, :5] = PAD  # left padding
    tok[2, 9] = EOS  # an in-stream </s>
    tok[3, 0] = EOS
    return tok


def hf_logits(model, tokens):
    """With attention_mask and the position ids `generate` derives from it (XGLM adds 2)."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    mask = (ids != PAD).long()
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.numpy()


def load_hf(path):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(model).__name__ == "XGLMForCausalLM" and model.config._attn_implementation == "eager"
    return model


def assert_logits_match(cfg, params, export_dir, seed=1):
    tokens = padded_batch(cfg.vocab_size, seed)
    ours, ref = our_logits(cfg, params, tokens), hf_logits(load_hf(export_dir), tokens)
    real = tokens != PAD
    assert np.abs(ref[real]).max() > 0.1
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-5, rtol=0)


# ---- export -----------------------------------------------------------------------------------------------


def test_tiny_export_logits_match_and_files(tmp_path, tiny):
    params, ckpt = tiny
    out = tmp_path / "hf"
    summary = hf.export_hf(ckpt, out, log=quiet)
    assert summary["files"] == ["model.safetensors"] and not summary["tokenizer"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "dict.txt", "generation_config.json",
                                                     "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert (config["d_model"], config["ffn_dim"], config["num_layers"], config["attention_heads"],
            config["max_position_embeddings"], config["vocab_size"]) == (64, 128, 2, 4, 64, 256)
    assert "attention_mask" in (out / "README.md").read_text()
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:  # the package reads our files
        got = {k: f.get_tensor(k) for k in f.keys()}
    want = hf.state_dict_from_params(params, CFG)
    assert list(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert_logits_match(CFG, params, out)


def test_release_converted_export_logits_match(tmp_path):
    dims = dict(d=32, ffn=64, layers=2, heads=8)
    merged = ff.merged_state(128, dims["d"], dims["ffn"], dims["layers"], seed=3)
    release = ff.write_release(tmp_path / "release", merged, **dims, dict_lines=121)
    convert_fairseq(release, tmp_path / "ckpt", log=quiet)
    hf.export_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_size="40KB", log=quiet)
    index = json.loads((tmp_path / "hf" / hf.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2 and len(index["weight_map"]) == 3 + 2 * 16
    cfg = params_io.load_model_config(tmp_path / "ckpt")
    params = jax.device_get(params_io.load_params(tmp_path / "ckpt", make_mesh(1, jax.devices()[:1]), logical_rules()))
    assert_logits_match(cfg.replace(dropout=0.0, attention_dropout=0.0), params, tmp_path / "hf", seed=2)


def our_greedy(cfg, params, prompt, steps):
    """Greedy continuation with full forwards: one right-padded buffer (causal: the pads never matter)."""
    fwd = jax.jit(lambda p, t: TransformerLM(cfg).apply({"params": p}, t))
    buf = np.full((1, len(prompt) + steps), PAD, np.int32)
    buf[0, :len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + steps):
        nxt = int(np.argmax(np.asarray(fwd(params, buf))[0, n - 1]))
        buf[0, n] = nxt
        if nxt == EOS:
            return buf[0, len(prompt):n + 1].tolist()
    return buf[0, len(prompt):].tolist()


def test_greedy_generate_equals_ours(tmp_path, tiny):
    params, ckpt = tiny
    hf.export_hf(ckpt, tmp_path / "hf", log=quiet)
    model = load_hf(tmp_path / "hf")
    rng = np.random.default_rng(4)
    prompts = [[EOS, *rng.integers(4, CFG.vocab_size, size=n).tolist()] for n in (3, 9, 6)]
    steps, width = 10, max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as for batched generation
        ids[i, width - len(p):] = torch.tensor(p)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=(ids != PAD).long(), max_new_tokens=steps,
                             do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    mesh = make_mesh(1, jax.devices()[:1])
    generator = Generator(CFG, params_io.load_params(ckpt, mesh, logical_rules()), mesh)
    decoded = generator.generate(prompts, SearchOptions(max_new_tokens=steps))  # the product's KV-cache search
    for i, p in enumerate(prompts):
        theirs = out[i, width:].tolist()
        if EOS in theirs:
            theirs = theirs[:theirs.index(EOS) + 1]
        assert theirs == our_greedy(CFG, params, p, steps) == decoded[i].tokens, i


# ---- tokenizer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dict_name", ["dict.txt", "dict.51200.txt"])
def test_tokenizer_ids_are_ours_on_wiki_test(tmp_path, shared_data, dict_name):
    bpe_dir = shared_data / "gpt2_bpe"
    dictionary = Dictionary.load(bpe_dir / dict_name)
    cfg = CFG.replace(vocab_size=51200)
    assert hf.write_tokenizer(tmp_path, bpe_dir, bpe_dir / dict_name, cfg, quiet)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    bpe = GPT2BPE.from_files(bpe_dir / "encoder.json", bpe_dir / "vocab.bpe")
    lines = (shared_data / "wikitext-103" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")
    lines += ["literal </s> and <unk> and <s> and <pad> stay text", "madeupword0001 <|endoftext|>", "  é ü 日本"]
    ours = [[dictionary.index(str(i)) for i in bpe.encode(line)] for line in lines]
    theirs = tok(lines, add_special_tokens=False)["input_ids"]
    bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert not bad, (len(bad), lines[bad[0]][:80])
    assert sum(map(len, ours)) > 200_000
    decoded = tok.batch_decode(theirs)
    assert [i for i, (a, b) in enumerate(zip(lines, decoded)) if a != b] == []
    assert tok("Hello world")["input_ids"] == [EOS] + [dictionary.index(str(i)) for i in bpe.encode("Hello world")]
    madeup = dictionary.index("madeupword0000")
    assert tok.convert_ids_to_tokens(madeup) == "madeupword0000"
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)


def test_export_with_tokenizer_end_to_end(tmp_path, shared_data):
    """A release-vocabulary model (tiny dims) exported with --bpe-dir: text -> ids -> logits, both sides."""
    bpe_dir = shared_data / "gpt2_bpe"
    cfg = CFG.replace(vocab_size=51200, d_model=32, ffn_dim=64, num_layers=1)
    params = random_params(cfg, seed=7)
    write_params(tmp_path / "ckpt", params, cfg, bpe_dir / "dict.51200.txt")
    summary = hf.export_hf(tmp_path / "ckpt", tmp_path / "hf", bpe_dir=bpe_dir, log=quiet)
    assert summary["tokenizer"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok.padding_side = "left"
    texts = ["The tower is 324 metres tall.", "Hi"]
    batch = tok(texts, return_tensors="pt", padding=True)
    dictionary = Dictionary.load(bpe_dir / "dict.51200.txt")
    bpe = GPT2BPE.from_files(bpe_dir / "encoder.json", bpe_dir / "vocab.bpe")
    first = [EOS] + [dictionary.index(str(i)) for i in bpe.encode(texts[0])]
    assert batch["input_ids"][0].tolist() == first
    tokens = batch["input_ids"].numpy().astype(np.int32)
    ours, ref = our_logits(cfg, params, tokens), hf_logits(load_hf(tmp_path / "hf"), tokens)
    np.testing.assert_allclose(ours[tokens != PAD], ref[tokens != PAD], atol=1e-5, rtol=0)


def test_small_dictionary_exports_model_without_tokenizer(tmp_path, tiny, shared_data):
    _, ckpt = tiny  # its dict.txt holds GPT-2 ids 1000..1251 only
    messages = []
    summary = hf.export_hf(ckpt, tmp_path / "hf", bpe_dir=shared_data / "gpt2_bpe", log=messages.append)
    assert not summary["tokenizer"] and not (tmp_path / "hf" / "tokenizer.json").exists()
    assert any(m.startswith("tokenizer not written: the dictionary lacks") for m in messages), messages


# ---- back, and training checkpoints -----------------------------------------------------------------------


def test_round_trip_is_exact(tmp_path, tiny):
    params, ckpt = tiny
    hf.export_hf(ckpt, tmp_path / "hf", log=quiet)
    hf.import_hf(tmp_path / "hf", tmp_path / "back", log=quiet)
    original, back = read_all(ckpt), read_all(tmp_path / "back")
    assert original.keys() == back.keys()
    for leaf in original:
        assert back[leaf].dtype == original[leaf].dtype
        np.testing.assert_array_equal(back[leaf], original[leaf], err_msg=str(leaf))
    assert params_io.load_model_config(tmp_path / "back") == CFG
    assert (tmp_path / "back" / "dict.txt").read_bytes() == (ckpt / "dict.txt").read_bytes()
    # bfloat16, sharded, through the command line: back as the bfloat16 rounding of the original
    convert_main(["--to-hf", str(ckpt), str(tmp_path / "hf16"), "--dtype", "bfloat16", "--max-shard-size", "100KB"])
    assert (tmp_path / "hf16" / hf.INDEX_NAME).is_file()
    convert_main(["--from-hf", str(tmp_path / "hf16"), str(tmp_path / "back16")])
    back16 = params_io.ParamsReader(tmp_path / "back16")
    assert back16.dtype_name == "bfloat16"
    for leaf, value in original.items():
        np.testing.assert_array_equal(back16.read(leaf), value.astype(params_io.numpy_dtype("bfloat16")))


def test_training_checkpoint_exports_to_both_formats(tmp_path):
    from train_fixtures import base_args, make_databin

    from m11b_jax.params_io import load_checkpoint
    from m11b_jax.train import run

    data = make_databin(tmp_path / "data", n_symbols=1020, n_lines=60, valid_lines=8)  # 1024 symbols = tiny's vocab
    run(base_args(data, tmp_path / "save", "--disable-validation", max_update=2))
    cfg, params, _ = load_checkpoint(tmp_path / "save", make_mesh(1, jax.devices()[:1]), logical_rules(), "float32")
    params = jax.device_get(params)
    hf.export_hf(tmp_path / "save", tmp_path / "hf", log=quiet)  # the newest update of a --save-dir
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="numpy") as f:
        for k, v in hf.state_dict_from_params(params, cfg).items():
            np.testing.assert_array_equal(f.get_tensor(k), v, err_msg=k)
    assert (tmp_path / "hf" / "dict.txt").read_bytes() == (data / "dict.txt").read_bytes()
    export_fairseq(tmp_path / "save" / "2", tmp_path / "fs", 1, log=quiet)  # one update's directory
    shard = load_shard(tmp_path / "fs" / "model.pt")["model"]
    for k, v in to_fairseq_state_dict(params, cfg.num_layers).items():
        np.testing.assert_array_equal(shard[k].numpy(), v, err_msg=k)


# ---- refusals ----------------------------------------------------------------------------------------------


def one_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        convert_main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_inputs_are_one_line_and_leave_nothing(tmp_path, tiny, capsys, shared_data):
    _, ckpt = tiny
    out = tmp_path / "out"
    (tmp_path / "exists").mkdir()
    assert "already exists" in one_error(capsys, ["--to-hf", ckpt, tmp_path / "exists"])
    (tmp_path / "empty").mkdir()
    assert "is not a checkpoint" in one_error(capsys, ["--to-hf", tmp_path / "empty", out])
    assert "is not a checkpoint" in one_error(capsys, ["--to-fairseq", tmp_path / "empty", out,
                                                       "--model-parallel-size", "1"])
    # a dictionary of other symbols than GPT-2 ids: the BPE files do not belong to it
    words = tmp_path / "words"
    words.mkdir()
    (words / "dict.txt").write_text("".join(f"w{i} {300 - i}\n" for i in range(CFG.vocab_size - 4)))
    write_params(words / "ckpt", random_params(CFG), CFG, words / "dict.txt")
    msg = one_error(capsys, ["--to-hf", words / "ckpt", out, "--bpe-dir", shared_data / "gpt2_bpe"])
    assert "'w0'" in msg and "do not belong" in msg
    assert "has no encoder.json" in one_error(capsys, ["--to-hf", ckpt, out, "--bpe-dir", tmp_path])
    # HF directories of another architecture, and of another size than their config says
    hf.export_hf(ckpt, tmp_path / "hf", log=quiet)
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert "not XGLMForCausalLM" in one_error(capsys, ["--from-hf", other, out])
    resized = tmp_path / "resized"
    resized.mkdir()
    for p in (tmp_path / "hf").iterdir():
        (resized / p.name).symlink_to(p)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (resized / "config.json").unlink()
    (resized / "config.json").write_text(json.dumps({**config, "ffn_dim": 256, "m11b_jax_config": None}))
    assert "another size" in one_error(capsys, ["--from-hf", resized, out])
    assert not out.exists() and leftovers(out) == []


def test_cli_refusal_has_no_traceback(tmp_path, tiny):
    _, ckpt = tiny
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "m11b_jax.convert", "--from-hf", str(ckpt), str(tmp_path / "o")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert errors == [f"error: {ckpt} is an m11b_jax params checkpoint, not a Hugging Face model directory: "
                      "--from-hf takes what --to-hf (or save_pretrained) wrote"], proc.stderr
    assert not (tmp_path / "o").exists()

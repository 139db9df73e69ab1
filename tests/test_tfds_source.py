"""TFDS source: a tiny local builder prepared as array_record, read back without TensorFlow."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from m11b_jax.blocks import TokenBlocks
from m11b_jax.dictionary import Dictionary
from m11b_jax.errors import UserError
from m11b_jax.indexed_dataset import MMapIndexedDataset
from m11b_jax.tfds_source import TFDSTextSource, gpt2_line_encoder, iter_sequences, token_stream, write_data_bin
from m11b_jax.tokenizer import GPT2BPE

DOCS = {
    "train": ["The first line.\nA second one, naïve café.\n\n", "  Another record  ", "", "🚀 emoji\r\nline"],
    "test": ["held out"],
}


class M11bTinyText(tfds.core.GeneratorBasedBuilder):
    """Four train and one test record with a `text` and an `id` field."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "id": tfds.features.Scalar(dtype=np.int32)}
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in DOCS}

    def _generate_examples(self, split):
        for i, text in enumerate(DOCS[split]):
            yield f"{split}-{i}", {"text": text, "id": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    M11bTinyText(data_dir=str(path), file_format="array_record").download_and_prepare()
    return path


@pytest.fixture(scope="module")
def encode(shared_data):
    d = shared_data / "gpt2_bpe"
    return gpt2_line_encoder(d / "encoder.json", d / "vocab.bpe", d / "dict.txt")


def stored_ids(source):
    """The stored record order is TFDS's (shuffled by key); match records by their id field."""
    return [source._records[i]["id"] for i in range(len(source))]


def test_reads_every_record(data_dir):
    source = TFDSTextSource("m11b_tiny_text", "train", data_dir=data_dir)
    assert len(source) == 4
    texts = list(source.texts())
    assert [DOCS["train"][i] for i in stored_ids(source)] == texts
    assert len(TFDSTextSource("m11b_tiny_text", "test", data_dir=data_dir)) == 1


def test_token_stream_matches_fairseq_pipeline(data_dir, encode, shared_data):
    source = TFDSTextSource("m11b_tiny_text", "train", data_dir=data_dir)
    tokens = token_stream(source, encode)
    # Same as BPE -> ids as text -> dict.txt -> + </s>, per non-empty stripped line.
    d = shared_data / "gpt2_bpe"
    bpe, dictionary = GPT2BPE.from_files(d / "encoder.json", d / "vocab.bpe"), Dictionary.load(d / "dict.txt")
    lines = [line.strip() for text in source.texts() for line in text.splitlines() if line.strip()]
    assert len(lines) == 5
    expected = np.concatenate([dictionary.encode_line(" ".join(map(str, bpe.encode(line)))) for line in lines])
    assert tokens.dtype == np.int32
    assert tokens.tolist() == expected.tolist()
    blocks = TokenBlocks(tokens, 8)
    assert blocks[0][0][0] == 2 and len(blocks) == -(-tokens.size // 8)


def test_write_data_bin(data_dir, encode, tmp_path):
    source = TFDSTextSource("m11b_tiny_text", "train", data_dir=data_dir)
    assert write_data_bin(source, encode, tmp_path / "train", vocab_size=50264) == 5
    ds = MMapIndexedDataset(tmp_path / "train")
    assert np.array_equal(np.asarray(ds.tokens()), token_stream(source, encode))


def test_no_tensorflow_needed(data_dir):
    """In a fresh interpreter of this environment (which has no TensorFlow), the source reads the
    prepared dataset and nothing imports TensorFlow."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        from m11b_jax.tfds_source import TFDSTextSource
        source = TFDSTextSource("m11b_tiny_text", "train", data_dir={str(data_dir)!r})
        print(len(list(source.texts())), importlib.util.find_spec("tensorflow"), "tensorflow" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "4 None False"


def test_iter_sequences_drops_empty_lines():
    seqs = list(iter_sequences(["a\n\n  b  \n", ""], lambda line: np.array([len(line)], np.int32)))
    assert [s.tolist() for s in seqs] == [[1, 2], [1, 2]]


# ---- bad input ------------------------------------------------------------------------------


def test_unknown_dataset(data_dir):
    with pytest.raises(UserError, match="'nope_text' is not prepared") as e:
        TFDSTextSource("nope_text", "train", data_dir=data_dir)
    assert "\n" not in str(e.value)


def test_unknown_split(data_dir):
    with pytest.raises(UserError, match="split 'valid'") as e:
        TFDSTextSource("m11b_tiny_text", "valid", data_dir=data_dir)
    assert "\n" not in str(e.value)


def test_unknown_field(data_dir):
    with pytest.raises(UserError, match=r"no field 'content'; its fields are \['id', 'text'\]"):
        TFDSTextSource("m11b_tiny_text", "train", text_field="content", data_dir=data_dir)


def test_non_text_field(data_dir):
    source = TFDSTextSource("m11b_tiny_text", "train", text_field="id", data_dir=data_dir)
    with pytest.raises(UserError, match="not text"):
        list(source.texts())

"""Text from a prepared TensorFlow Datasets dataset, tokenized into a token stream; no TensorFlow needed.

    source = TFDSTextSource("my_corpus", "train", text_field="text", data_dir="~/tensorflow_datasets")
    encode = gpt2_line_encoder("encoder.json", "vocab.bpe", "dict.txt")   # or sentencepiece_line_encoder
    tokens = token_stream(source, encode)          # 1-D int32, ready for blocks.TokenBlocks
    write_data_bin(source, encode, "data-bin/train", vocab_size=len(Dictionary.load("dict.txt")))

The dataset must already be prepared on disk in the `array_record` file format (e.g. `tfds build
NAME --file_format=array_record` on a machine with internet); it is opened read-only with
`tfds.data_source(..., download=False)`, which reads ArrayRecord files by random access and
needs neither TensorFlow nor the dataset's builder code. Records are read in their stored order.

Each record's text is cut into lines; every non-empty stripped line is encoded and ends with
`</s>`, as a fairseq data-bin made from the same text would be (BPE drops empty lines, the
dictionary appends `</s>`).
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np

from .dictionary import EOS, Dictionary
from .errors import UserError
from .indexed_dataset import MMapIndexedDatasetBuilder, dtype_for_vocab

LineEncoder = Callable[[str], np.ndarray]


class TFDSTextSource:
    """The `text_field` strings of one split of a prepared TFDS dataset, by random access."""

    def __init__(self, name: str, split: str, *, text_field: str = "text", data_dir: str | os.PathLike | None = None):
        import tensorflow_datasets as tfds

        self.name, self.split, self.text_field = name, split, text_field
        data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir is not None else None
        where = data_dir or "the default TFDS data_dir"
        try:
            self._records = tfds.data_source(
                name,
                split=split,
                data_dir=data_dir,
                download=False,
                try_gcs=False,
                builder_kwargs={"file_format": "array_record"},
            )
        except tfds.core.registered.DatasetNotFoundError:
            raise UserError(
                f"TFDS dataset {name!r} is not prepared in {where}: run `tfds build {name} "
                "--file_format=array_record` where there is internet, then pass its data_dir"
            ) from None
        except (ValueError, AssertionError, NotImplementedError, FileNotFoundError) as e:
            first = str(e).strip().split("\n")[0]
            raise UserError(
                f"cannot open TFDS {name!r} split {split!r} in {where} as array_record: {first} "
                "(prepare it with --file_format=array_record; check the split name)"
            ) from None
        if len(self._records) and text_field not in self._records[0]:
            raise UserError(
                f"TFDS {name!r} has no field {text_field!r}; its fields are {sorted(self._records[0])}: "
                "pass the text field's name"
            )

    def __len__(self) -> int:
        return len(self._records)

    def text(self, i: int) -> str:
        value = self._records[i][self.text_field]
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"TFDS {self.name!r} record {i}: field {self.text_field!r} is not UTF-8 text") from None
        if not isinstance(value, str):
            raise UserError(f"TFDS {self.name!r} field {self.text_field!r} holds {type(value).__name__}, not text")
        return value

    def texts(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self.text(i)


def gpt2_line_encoder(encoder_json, vocab_bpe, dict_txt) -> LineEncoder:
    """line -> dictionary indices of its GPT-2 BPE ids (the fairseq pipeline: BPE id as text -> dict)."""
    from .tokenizer import GPT2BPE

    bpe = GPT2BPE.from_files(encoder_json, vocab_bpe)
    dictionary = Dictionary.load(dict_txt)
    lookup = np.array([dictionary.index(str(i)) for i in range(max(bpe.encoder.values()) + 1)], dtype=np.int32)
    return lambda line: lookup[np.asarray(bpe.encode(line), dtype=np.int64)]


def sentencepiece_line_encoder(model_path) -> LineEncoder:
    """line -> SentencePiece ids, for a model whose ids are the dictionary indices (see corpus.py)."""
    import sentencepiece as spm

    if not os.path.isfile(model_path):
        raise UserError(f"SentencePiece model not found: {model_path}")
    sp = spm.SentencePieceProcessor(model_file=os.fspath(model_path))
    return lambda line: np.asarray(sp.encode(line), dtype=np.int32)


def iter_sequences(texts, encode_line: LineEncoder, *, eos: int = EOS) -> Iterator[np.ndarray]:
    """One int32 array (+ `</s>`) per non-empty stripped line of each text."""
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            if line:
                yield np.append(encode_line(line), np.int32(eos)).astype(np.int32)


def token_stream(source, encode_line: LineEncoder) -> np.ndarray:
    """The whole source as one 1-D int32 token stream (held in memory; see write_data_bin for big data)."""
    sequences = list(iter_sequences(source.texts(), encode_line))
    if not sequences:
        raise UserError(f"{getattr(source, 'name', 'the source')} holds no text: nothing to tokenize")
    return np.concatenate(sequences)


def write_data_bin(source, encode_line: LineEncoder, prefix, vocab_size: int) -> int:
    """Write the source as fairseq PREFIX.bin/.idx (streamed, all-or-nothing); returns the sequence count."""
    count = 0
    with MMapIndexedDatasetBuilder(prefix, dtype_for_vocab(vocab_size), vocab_size=vocab_size) as out:
        for seq in iter_sequences(source.texts(), encode_line):
            out.add_item(seq)
            count += 1
        if count == 0:
            raise UserError(f"{getattr(source, 'name', 'the source')} holds no text: nothing to write")
    return count

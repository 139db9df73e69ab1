"""The Python API: load a checkpoint once, then encode, decode, score and generate.

    from m11b_jax import LanguageModel

    lm = LanguageModel.load("ckpt")            # a converted (--bpe-dir) or trained checkpoint directory
    lm.generate(["The capital of France is"], max_new_tokens=8)        # -> ["..."] continuations
    lm.score(["Hello world"])[0]["total"]                               # natural-log probability

Text is GPT-2 BPE-encoded, mapped through the checkpoint's dict.txt and prefixed with `</s>` (fairseq's LM
input convention); prompts may also be lists of dictionary ids, used exactly as given.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

from m11b_jax.errors import UserError


class LanguageModel:
    """A checkpoint laid out on a (data, model) mesh of this host's devices, with its dictionary and BPE."""

    def __init__(self, cfg, params, mesh, rules, dictionary=None, bpe=None):
        from m11b_jax.generation import Generator

        self.cfg, self.params, self.mesh, self.rules = cfg, params, mesh, rules
        self.dictionary, self.bpe = dictionary, bpe
        self.generator = Generator(cfg, params, mesh, rules)
        self._score_fns = {}

    @classmethod
    def load(cls, path: str | os.PathLike, *, model_parallel_size: int | None = None, dtype: str = "float32",
             bpe_dir: str | os.PathLike | None = None, devices=None) -> "LanguageModel":
        """Load `path` (python -m m11b_jax.convert output, or a training --save-dir / update directory).

        model_parallel_size: devices each layer is split over (default: the most the model and devices allow);
        dtype: float32 or bfloat16; bpe_dir: encoder.json/vocab.bpe when the checkpoint does not carry them."""
        import jax

        from m11b_jax import params_io
        from m11b_jax import sharding
        from m11b_jax.config import largest_model_parallel
        from m11b_jax.dictionary import Dictionary
        from m11b_jax.params_io import load_checkpoint
        from m11b_jax.runtime import retain_host_memory_on_cpu

        devices = list(jax.devices() if devices is None else devices)
        if model_parallel_size is None:
            cfg0 = _stored_config(path)
            model_parallel_size = largest_model_parallel(cfg0, len(devices))
        mesh = sharding.make_mesh(model_parallel_size, devices)
        retain_host_memory_on_cpu(mesh)
        rules = sharding.logical_rules()
        cfg, params, dict_path = load_checkpoint(path, mesh, rules, dtype)
        cfg = cfg.replace(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
        cfg.validate(model_parallel_size)
        dictionary = Dictionary.load(dict_path) if dict_path is not None else None
        folder = bpe_dir if bpe_dir is not None else params_io.bpe_folder(path)
        bpe = None
        if folder is not None:
            from m11b_jax.tokenizer import GPT2BPE

            files = params_io.check_bpe_dir(folder)
            bpe = GPT2BPE.from_files(*files)
        return cls(cfg, params, mesh, rules, dictionary, bpe)

    # ---- text <-> ids ------------------------------------------------------------------------------

    def _need_text(self):
        if self.bpe is None or self.dictionary is None:
            missing = "encoder.json/vocab.bpe" if self.bpe is None else "dict.txt"
            raise UserError(f"text needs the checkpoint's {missing}: convert with --bpe-dir DIR (and its dict.txt), "
                            "pass bpe_dir=/--bpe-dir, or give prompts as dictionary ids (--prompt-ids)")

    def encode(self, text: str) -> list[int]:
        """`</s>` followed by the dictionary ids of text's BPE tokens (unknown BPE ids -> <unk>)."""
        self._need_text()
        return [self.dictionary.eos()] + [self.dictionary.index(str(t)) for t in self.bpe.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of dictionary ids; special symbols (<s>, <pad>, </s>, <unk>) and made-up padding words are dropped."""
        self._need_text()
        bpe_ids = []
        for i in ids:
            sym = self.dictionary[int(i)]
            if sym.isdigit():
                bpe_ids.append(int(sym))
        return self.bpe.decode(bpe_ids)

    def _prompt_ids(self, prompt) -> list[int]:
        return self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    # ---- generation --------------------------------------------------------------------------------

    def generate(self, prompts, *, max_new_tokens: int = 32, sampling: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, beam: int = 1, lenpen: float = 1.0,
                 batch_size: int | None = None, return_ids: bool = False):
        """Continue each prompt (text, or a list of dictionary ids used as given). Returns the continuations'
        text (a list, or one string for one text prompt), or with return_ids the `generation.Generation`
        objects (prompt ids, new ids ending with 2 if `</s>` was produced, sum of log-probs)."""
        from m11b_jax.generation import SearchOptions

        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        ids = [self._prompt_ids(p) for p in prompts]
        opts = SearchOptions(max_new_tokens=max_new_tokens, sampling=sampling, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, beam=beam, lenpen=lenpen)
        results = self.generator.generate(ids, opts, batch_size=batch_size)
        if return_ids:
            return results
        texts = [self.decode(r.tokens) for r in results]
        return texts[0] if single else texts

    # ---- scoring -----------------------------------------------------------------------------------

    def score(self, texts, batch_size: int = 8) -> list[dict]:
        """Per text (or list of dictionary ids starting with `</s>`): the natural-log probability of each token
        after the first and of a final `</s>` (eval_lm's numbers for a one-line file that fits one window):
        {"tokens": ids scored, "logprobs": [...], "total": sum}."""
        import jax
        import jax.numpy as jnp

        from m11b_jax import sharding
        from m11b_jax.generation import bucket

        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        rows = [self._prompt_ids(t) for t in texts]
        for i, r in enumerate(rows):
            if not r:
                raise UserError(f"text {i} is empty: give at least one token")
            if len(r) > self.cfg.max_positions:
                raise UserError(f"text {i} has {len(r)} tokens > the model's {self.cfg.max_positions} positions: "
                                "split it (or use python -m m11b_jax.eval_lm, which scores any length in windows)")
        from m11b_jax.axis_names import BATCH

        data = sharding.mesh_size(self.mesh, sharding.mesh_axes(BATCH, self.rules))
        per_call = -(-max(batch_size, data) // data) * data
        out = []
        for start in range(0, len(rows), per_call):
            chunk = rows[start:start + per_call]
            length = bucket(max(map(len, chunk)))
            tokens = np.full((per_call, length), self.cfg.pad_idx, np.int32)
            targets = np.full((per_call, length), self.cfg.pad_idx, np.int32)
            for i, r in enumerate(chunk):
                tokens[i, :len(r)] = r
                targets[i, :len(r)] = r[1:] + [self.dictionary.eos() if self.dictionary else 2]
            fn = self._score_fn(length)
            rows_sharding = sharding.batch_sharding(self.mesh, 2, rules=self.rules)
            with sharding.activate(self.mesh, self.rules):
                lp = np.asarray(fn(self.params, jax.device_put(jnp.asarray(tokens), rows_sharding),
                                   jax.device_put(jnp.asarray(targets), rows_sharding)))
            for i, r in enumerate(chunk):
                n = len(r)
                out.append({"tokens": targets[i, :n].tolist(), "logprobs": lp[i, :n].tolist(),
                            "total": float(lp[i, :n].sum())})
        return out[0] if single else out

    def _score_fn(self, length: int):
        if length not in self._score_fns:
            import jax
            import jax.numpy as jnp

            from m11b_jax.model import TransformerLM

            model = TransformerLM(self.cfg)

            def fn(params, tokens, targets):
                logits = model.apply({"params": params}, tokens).astype(jnp.float32)
                lp = jax.nn.log_softmax(logits, axis=-1)
                return jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]

            self._score_fns[length] = jax.jit(fn)
        return self._score_fns[length]


def _stored_config(path):
    """The model config of a checkpoint directory, without loading it (for the default model-parallel size)."""
    from m11b_jax import checkpoint as train_ckpt
    from m11b_jax import params_io

    path = pathlib.Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {path} (give the directory written by python -m m11b_jax.convert)")
    point = train_ckpt.training_point(path)
    return train_ckpt.stored_model_config(*point) if point else params_io.load_model_config(path)

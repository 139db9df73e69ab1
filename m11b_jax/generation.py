"""Decoding with the model's own layers and a key/value cache: greedy, sampling and beam search.

`Generator(cfg, params, mesh)` holds a model laid out on a (data, model) mesh and compiles, per shape bucket:

* `prefill(cache, tokens)`: the whole left-padded prompt batch [batch, P] in one call; returns the next-token
  log-probabilities [batch, vocab] (fp32) and the cache;
* `step(cache, tokens)`: one new token per row [batch]; same outputs. Drive these two by hand for a custom
  loop (serving), or
* `generate(prompts, options)`: prefill, then one compiled step per token inside a `lax.while_loop`, all in
  one jitted call (no Python loop of dispatches).

The cache is `TransformerLM(cfg, decode=True)`'s `cache` collection: keys and values [layers, batch, C, heads,
head_dim] with batch -> data and heads -> model from the sharding table, plus each row's count of real tokens
(positions continue per row: `cumsum(non-pad) + pad`, as fairseq) and the mask of real cache columns.
Prompt lengths P and cache lengths C are rounded up to powers of two (at least 16), and the batch to a power of
two times the data-parallel size, so a long-running process compiles once per bucket, not per request.

The rules (fairseq's `SequenceGenerator`, ../shared/REFERENCE.md "Generation"): pad is never selected; a row
ends after it produces `</s>` (which is part of its output); prompt + new tokens never exceed the model's
positions. Beam search keeps `beam` hypotheses per prompt, finishes a hypothesis when it produces `</s>` among
the top `beam` of the 2 x beam candidates, ranks finished ones by sum of log-probs / length^lenpen (length
counts the new tokens, `</s>` included) and stops a prompt once `beam` hypotheses are finished. When
max_new_tokens is reached, the unfinished candidates are finished as they are (no `</s>` forced: a cap on new
tokens, like transformers' `max_new_tokens`). Sampling: log-probs of logits / temperature, restricted to the
top-k and then the top-p nucleus, drawn with a key made from (seed, prompt index, step): the same seed gives
the same tokens on any mesh and in any batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from functools import partial
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from m11b_jax import sharding
from m11b_jax.axis_names import BATCH
from m11b_jax.config import ModelConfig
from m11b_jax.errors import UserError
from m11b_jax.model import TransformerLM

EOS = 2
MIN_BUCKET = 16
_NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """How to pick new tokens (fairseq's flag names in the CLI)."""

    max_new_tokens: int = 32
    sampling: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k restriction
    top_p: float = 1.0  # 1.0: no nucleus restriction
    seed: int = 0
    beam: int = 1
    lenpen: float = 1.0

    def validate(self) -> "SearchOptions":
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} must be >= 1")
        if self.beam < 1:
            raise UserError(f"--beam {self.beam} must be >= 1")
        if self.beam > 1 and self.sampling:
            raise UserError(f"--beam {self.beam} with --sampling: choose one (beam search or sampling)")
        if self.temperature <= 0:
            raise UserError(f"--temperature {self.temperature} must be > 0")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} must be >= 0 (0: no restriction)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p {self.top_p} must be in (0, 1]")
        if not self.sampling and (self.top_k or self.top_p < 1.0 or self.temperature != 1.0):
            raise UserError("--temperature/--top-k/--top-p apply to sampling: add --sampling")
        return self


@dataclasses.dataclass
class Generation:
    """One prompt's result: the prompt ids, the new ids (ending with 2 if `</s>` was produced) and the sum of
    their log-probs (natural log; for sampling, of the distribution at the temperature)."""

    prompt_ids: list[int]
    tokens: list[int]
    logprob: float


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Next power of two >= max(n, minimum)."""
    return 1 << (max(int(n), minimum, 1) - 1).bit_length()


def check_prompts(prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int) -> list[list[int]]:
    """The prompts as lists of ints, with one-line errors for what cannot be decoded."""
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise UserError(f"prompt {i} is empty: give at least one token (text prompts start with </s>)")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise UserError(f"prompt {i} holds token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size}): "
                            "use ids of the checkpoint's dictionary")
        if cfg.pad_idx in p:
            raise UserError(f"prompt {i} holds the pad id {cfg.pad_idx}: prompts are real tokens only")
        if len(p) + max_new_tokens > cfg.max_positions:
            raise UserError(f"prompt {i} has {len(p)} tokens; with --max-new-tokens {max_new_tokens} that is "
                            f"{len(p) + max_new_tokens} > the model's {cfg.max_positions} positions: shorten the "
                            "prompt or lower --max-new-tokens")
        out.append(p)
    if not out:
        raise UserError("no prompts given")
    return out


def left_pad(prompts: Sequence[Sequence[int]], rows: int, length: int, pad: int) -> np.ndarray:
    """[rows, length] int32, each prompt right-aligned; rows past the prompts hold a lone `</s>`."""
    out = np.full((rows, length), pad, dtype=np.int32)
    for i in range(rows):
        p = prompts[i] if i < len(prompts) else [EOS]
        out[i, length - len(p):] = p
    return out


# ---- the search rules, on next-token log-probs [rows, vocab] ----------------------------------------


def _logprobs(logits, pad: int):
    """fp32 log-softmax with pad excluded."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return lp.at[:, pad].set(_NEG)


def restrict(lp, top_k: int, top_p: float):
    """Set -inf outside the top-k, then outside the smallest set whose probability reaches top_p."""
    if top_k:
        kth = jax.lax.top_k(lp, top_k)[0][:, -1:]
        lp = jnp.where(lp < kth, _NEG, lp)
    if top_p < 1.0:
        desc = -jnp.sort(-lp, axis=-1)
        probs = jnp.exp(desc - jax.nn.logsumexp(desc, axis=-1, keepdims=True))
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
        kept = jnp.where(before < top_p, desc, jnp.inf).min(axis=-1, keepdims=True)  # smallest kept log-prob
        lp = jnp.where(lp < kept, _NEG, lp)
    return lp


# ---- the compiled model calls ---------------------------------------------------------------------


class Generator:
    """A model on a mesh, ready to decode. `params` must be laid out on `mesh` with the sharding table `rules`."""

    def __init__(self, cfg: ModelConfig, params, mesh, rules=None):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.rules = sharding.logical_rules() if rules is None else rules
        self.model = TransformerLM(cfg, decode=True)
        self._compiled = {}

    # the pieces, for a hand-driven loop

    def cache_shardings(self, batch: int, length: int):
        """(NamedShardings, ShapeDtypeStructs) of the cache for `batch` rows of `length` columns."""
        key = ("cache", batch, length)
        if key not in self._compiled:
            abstract = jax.eval_shape(lambda: self.model.init(jax.random.key(0),
                                                              jnp.zeros((batch, length), jnp.int32)))
            specs = nn.get_partition_spec(abstract)["cache"]
            shapes = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, abstract["cache"],
                                  is_leaf=lambda x: isinstance(x, nn.Partitioned))
            self._compiled[key] = (sharding.logical_to_sharding(specs, self.mesh, self.rules), shapes)
        return self._compiled[key]

    def init_cache(self, batch: int, length: int):
        """Zeros for `batch` rows of `length` cache columns, each shard made on its device."""
        shardings, shapes = self.cache_shardings(batch, length)
        make = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes), out_shardings=shardings)
        with sharding.activate(self.mesh, self.rules):
            return make()

    def _apply(self, params, cache, tokens):
        """Run the model on tokens [rows, t] after what the cache holds: (fp32 log-probs of the next token, cache)."""
        def last_logits(m, tok):
            return m.logits(m.hidden_states(tok)[:, -1:])[:, 0]

        logits, vars_ = self.model.apply({"params": params, "cache": cache}, tokens, method=last_logits,
                                         mutable=["cache"])
        return logits, vars_["cache"]

    def _jit(self, key, fn):
        if key not in self._compiled:
            self._compiled[key] = jax.jit(fn)
        return self._compiled[key]

    def prefill(self, cache, tokens):
        """tokens [rows, P] (left-padded, placed like the batch): (log-probs [rows, vocab] fp32, pad -inf, cache)."""
        fn = self._jit("apply", lambda p, c, t: (lambda lg, c2: (_logprobs(lg, self.cfg.pad_idx), c2))(
            *self._apply(p, c, t)))
        with sharding.activate(self.mesh, self.rules), _precision(self.cfg):
            return fn(self.params, cache, tokens)

    def step(self, cache, tokens):
        """tokens [rows] (one per row; pad for a finished row): same as prefill."""
        return self.prefill(cache, tokens[:, None])

    # the whole search in one compiled call

    def generate(self, prompts: Sequence[Sequence[int]], options: SearchOptions = SearchOptions(),
                 batch_size: int | None = None, *, seeds: Sequence[int] | None = None,
                 listener=None) -> list[Generation]:
        """Decode every prompt (lists of dictionary ids, used as given); results in input order.

        seeds: one sampling seed per prompt, each prompt then drawing what it would draw as the only prompt of a
        call with that seed (a server's independent requests); default: options.seed, prompt i drawing as the
        i-th prompt.
        listener: `listener(step, tokens, done) -> stop`, called on the host after every step of greedy or
        sampling search with that step's tokens [rows] (pad for a row that had already ended) and which rows
        have ended [rows]; rows where the bool array it returns is true end there (streaming, stop strings,
        a client gone). Rows past the prompts are padding: stop them."""
        opts = options.validate()
        if listener is not None and opts.beam > 1:
            raise UserError("a step listener (streaming) works with greedy search and sampling, not --beam")
        if seeds is not None and len(seeds) != len(prompts):
            raise UserError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
        prompts = check_prompts(prompts, self.cfg, opts.max_new_tokens)
        data = sharding.mesh_size(self.mesh, sharding.mesh_axes(BATCH, self.rules))  # the batch's shards
        per_call = len(prompts) if batch_size is None else batch_size
        if per_call < 1:
            raise UserError(f"--batch-size {per_call} must be >= 1")
        beam = opts.beam
        rows = bucket(per_call, 1)
        while (rows * beam) % data:
            rows *= 2
        results = []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            plen = bucket(max(len(p) for p in chunk))
            clen = bucket(plen + opts.max_new_tokens)
            tokens = left_pad(chunk, rows, plen, self.cfg.pad_idx)
            if seeds is None:
                row_seeds, row_ids = np.full(rows, opts.seed, np.uint32), np.arange(start, start + rows, dtype=np.int32)
            else:
                row_seeds = np.zeros(rows, np.uint32)
                row_seeds[:len(chunk)] = seeds[start:start + len(chunk)]
                row_ids = np.zeros(rows, np.int32)
            out, lengths, scores = self._search(tokens, row_ids, row_seeds, clen, opts, listener)
            out, lengths, scores = np.asarray(out), np.asarray(lengths), np.asarray(scores)
            for i, p in enumerate(chunk):
                results.append(Generation(p, out[i, :lengths[i]].tolist(), float(scores[i])))
        return results

    def _search(self, tokens, row_ids, row_seeds, clen: int, opts: SearchOptions, listener=None):
        rows, plen = tokens.shape
        n_out = clen - plen
        listen = listener is not None
        key = ("search", rows, plen, clen, dataclasses.replace(opts, max_new_tokens=0, seed=0), listen)
        if key not in self._compiled:
            fn = partial(_beam_search if opts.beam > 1 else _token_search, self, opts=opts, clen=clen, n_out=n_out,
                         listen=listen)
            self._compiled[key] = jax.jit(fn)
        self.cache_shardings(rows * opts.beam, clen)
        self.cache_shardings(rows, clen)
        batch = sharding.batch_sharding(self.mesh, 2, rules=self.rules)
        with sharding.activate(self.mesh, self.rules), _precision(self.cfg):
            tokens = jax.device_put(tokens, batch)
            batch_rows = sharding.batch_sharding(self.mesh, 1, rules=self.rules)
            row_ids = jax.device_put(row_ids, batch_rows)
            row_seeds = jax.device_put(row_seeds, batch_rows)
            with _listening(listener) as call_id:
                return jax.block_until_ready(self._compiled[key](
                    self.params, tokens, row_ids, jnp.int32(opts.max_new_tokens), row_seeds, jnp.int32(call_id)))


def _precision(cfg: ModelConfig):
    """fp32 decoding means fp32 matmuls on GPUs too (no TF32), as eval_lm."""
    return jax.default_matmul_precision("highest" if cfg.compute_dtype == "float32" else None)


def _zero_cache(gen: Generator, rows: int, clen: int):
    shardings, shapes = gen.cache_shardings(rows, clen)
    return jax.tree.map(lambda a, s: jax.lax.with_sharding_constraint(jnp.zeros(a.shape, a.dtype), s),
                        shapes, shardings)


# Step listeners of the calls in flight, by call id: the compiled search calls back into `_dispatch` with its id.
_LISTENERS: dict[int, object] = {}
_NEXT_CALL = [0]
_LISTENERS_LOCK = threading.Lock()


@contextlib.contextmanager
def _listening(listener):
    if listener is None:
        yield 0
        return
    with _LISTENERS_LOCK:
        _NEXT_CALL[0] += 1
        call_id = _NEXT_CALL[0]
        _LISTENERS[call_id] = listener
    try:
        yield call_id
    finally:
        with _LISTENERS_LOCK:
            del _LISTENERS[call_id]


def _dispatch(call_id, step, tokens, done):
    stop = _LISTENERS[int(call_id)](int(step), np.asarray(tokens), np.asarray(done))
    return np.asarray(stop, dtype=bool).reshape(np.shape(done))


def _token_search(gen: Generator, params, tokens, row_ids, max_new, row_seeds, call_id, *, opts: SearchOptions,
                  clen: int, n_out: int, listen: bool = False):
    """Greedy or sampling: prefill, then a while_loop of one model step per token."""
    pad = gen.cfg.pad_idx
    rows = tokens.shape[0]
    row_keys = (jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(row_seeds, row_ids)
                if opts.sampling else None)

    def pick(logits, i):
        """Greedy or sampled next token per row: (tokens [rows], their log-probs [rows])."""
        if not opts.sampling:
            lp = _logprobs(logits, pad)
            tok = jnp.argmax(lp, axis=-1).astype(jnp.int32)
        else:
            lp = _logprobs(logits.astype(jnp.float32) / opts.temperature, pad)
            keys = jax.vmap(lambda key: jax.random.fold_in(key, i))(row_keys)
            tok = jax.vmap(jax.random.categorical)(keys, restrict(lp, opts.top_k, opts.top_p)).astype(jnp.int32)
        return tok, jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]

    def emit(state, logits):
        cache, i, out, done, total, length = state
        tok, lp = pick(logits, i)
        tok = jnp.where(done, pad, tok)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        total = total + jnp.where(done, 0.0, lp)
        length = length + (~done).astype(jnp.int32)
        done = done | (tok == EOS)
        if listen:  # the host sees this step's tokens and may end rows
            seen = [jax.lax.with_sharding_constraint(x, sharding.replicated(gen.mesh)) for x in (tok, done)]
            done = done | io_callback(_dispatch, jax.ShapeDtypeStruct(done.shape, jnp.bool_), call_id, i, *seen)
        return cache, i + 1, out, done, total, length

    logits, cache = gen._apply(params, _zero_cache(gen, rows, clen), tokens)
    state = (cache, jnp.int32(0), jnp.full((rows, n_out), pad, jnp.int32), jnp.zeros(rows, bool),
             jnp.zeros(rows, jnp.float32), jnp.zeros(rows, jnp.int32))
    state = emit(state, logits)

    def body(state):
        cache, i, out = state[:3]
        logits, cache = gen._apply(params, cache, jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1))
        return emit((cache,) + state[1:], logits)

    def cond(state):
        return (state[1] < max_new) & ~jnp.all(state[3])

    _, _, out, _, total, length = jax.lax.while_loop(cond, body, state)
    return out, length, total


def _beam_search(gen: Generator, params, tokens, row_ids, max_new, row_seeds, call_id, *, opts: SearchOptions,
                 clen: int, n_out: int, listen: bool = False):
    """Beam search (see the module docstring) over rows x beam cache rows."""
    del row_ids, row_seeds, call_id, listen
    pad, k = gen.cfg.pad_idx, opts.beam
    b = tokens.shape[0]
    logits, cache = gen._apply(params, _zero_cache(gen, b, clen), tokens)
    # Every beam starts from its prompt: repeat the prompt's cache rows and logits k times.
    cache = _take_rows(cache, jnp.repeat(jnp.arange(b), k))
    logits = jnp.repeat(logits, k, axis=0)
    running = jnp.full((b, k, n_out), pad, jnp.int32)
    run_score = jnp.where(jnp.arange(k) == 0, 0.0, _NEG)[None].repeat(b, 0)  # only beam 0 at the first step
    fin = jnp.full((b, k, n_out), pad, jnp.int32)
    fin_norm = jnp.full((b, k), _NEG)
    fin_sum = jnp.zeros((b, k))
    fin_len = jnp.zeros((b, k), jnp.int32)
    state = (cache, jnp.int32(0), logits, running, run_score, fin, fin_norm, fin_sum, fin_len)

    def body(state):
        cache, i, logits, running, run_score, fin, fin_norm, fin_sum, fin_len = state
        v = logits.shape[-1]
        lp = _logprobs(logits, pad).reshape(b, k, v)
        acc = (run_score[:, :, None] + lp).reshape(b, k * v)
        cand_score, cand = jax.lax.top_k(acc, 2 * k)  # [b, 2k], best first
        parent, tok = cand // v, (cand % v).astype(jnp.int32)
        seqs = jnp.take_along_axis(running, parent[:, :, None], axis=1)
        seqs = jax.lax.dynamic_update_slice(seqs, tok[:, :, None], (0, 0, i))
        ends = (tok == EOS) | (i + 1 >= max_new)  # at the cap every candidate is finished as it is
        done = fin_norm[:, -1] > _NEG
        new_norm = cand_score / ((i + 1).astype(jnp.float32) ** opts.lenpen)
        finishing = ends & (jnp.arange(2 * k) < k)[None] & ~done[:, None] & (cand_score > _NEG)
        merged_norm = jnp.concatenate([fin_norm, jnp.where(finishing, new_norm, _NEG)], axis=1)
        top_norm, top = jax.lax.top_k(merged_norm, k)
        take = lambda a, c: jnp.take_along_axis(jnp.concatenate([a, c], axis=1), top.reshape(  # noqa: E731
            top.shape + (1,) * (a.ndim - 2)), axis=1)
        fin = take(fin, seqs)
        fin_sum = take(fin_sum, cand_score)
        fin_len = take(fin_len, jnp.broadcast_to(i + 1, cand_score.shape).astype(jnp.int32))
        fin_norm = top_norm
        # The k best candidates that did not end continue.
        run_cand = jnp.where(tok == EOS, _NEG, cand_score)
        run_score, keep = jax.lax.top_k(run_cand, k)
        running = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
        parent_rows = (jnp.take_along_axis(parent, keep, axis=1) + jnp.arange(b)[:, None] * k).reshape(-1)
        next_tok = jnp.take_along_axis(tok, keep, axis=1).reshape(-1)
        cache = _take_rows(cache, parent_rows)
        stop = (i + 1 >= max_new) | jnp.all(fin_norm[:, -1] > _NEG)
        logits, cache = jax.lax.cond(stop, lambda c: (logits, c),
                                     lambda c: gen._apply(params, c, next_tok[:, None]), cache)
        return cache, i + 1, logits, running, run_score, fin, fin_norm, fin_sum, fin_len

    def cond(state):
        i, fin_norm = state[1], state[6]
        return (i < max_new) & ~jnp.all(fin_norm[:, -1] > _NEG)

    state = jax.lax.while_loop(cond, body, state)
    fin, fin_sum, fin_len = state[5], state[7], state[8]
    return fin[:, 0], fin_len[:, 0], fin_sum[:, 0]


def _take_rows(cache, rows):
    """The cache's batch rows `rows` (layer caches: axis 1, under the stacked layer axis; the rest: axis 0)."""
    def take(path, a):
        if a.ndim == 0:
            return a
        axis = 1 if any(getattr(p, "key", None) == "layers" for p in path) else 0
        return jnp.take(a, rows, axis=axis)

    return jax.tree_util.tree_map_with_path(take, cache)


def max_new_tokens_for(prompts: Sequence[Sequence[int]], cfg: ModelConfig) -> int:
    """The most new tokens the longest prompt allows within the model's positions."""
    return cfg.max_positions - max(len(p) for p in prompts)


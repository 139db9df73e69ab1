"""`python -m m11b_jax.serve`: an HTTP completions API over a checkpoint, with a demo page.

    python -m m11b_jax.serve --path CKPT [--host 127.0.0.1] [--port 8000] [--model-parallel-size N]
        [--dtype float32|bfloat16] [--max-batch-size 16] [--max-new-tokens-limit 256] [--max-queue 64]

Endpoints:
    POST /v1/completions   OpenAI-style: prompt (string or list of strings), max_tokens, temperature, top_p,
                           top_k, seed, stop, n (1), stream; answers choices[].text/finish_reason and usage, or
                           with "stream": true server-sent events, one per new token, then `data: [DONE]`.
    POST /v1/score         {"input": text or list of texts}: per-token natural-log probabilities
                           (LanguageModel.score: eval_lm's numbers).
    GET  /health           {"status": "ok", ...}
    GET  /                 the demo page.

Batching: requests wait in a bounded queue (429 beyond it). A scheduler thread takes every queued request (up to
--max-batch-size rows) into ONE decode of the generator (`m11b_jax.generation`: prefill, then one compiled step
per token inside a jitted loop), so requests that arrive while a batch decodes join the NEXT batch (not the
running one). Each step's tokens reach the host through a callback of that loop, which streams them to their
clients and tells the loop which rows to stop (a `stop` string, the request's own max_tokens, or a client that
went away frees its row at once). Requests whose sampling settings differ decode in separate batches.

Semantics follow OpenAI's completions API where it has one: temperature 0 is greedy search, any other value samples
at that temperature (default 1.0); top_k 0 and top_p 1.0 restrict nothing; without a seed, sampling draws one.
A request with a seed returns what `python -m m11b_jax.generate --sampling --seed S` returns for that prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import pathlib
import queue
import secrets
import socketserver
import sys
import threading
import time
from typing import Sequence

import numpy as np

from m11b_jax.errors import UserError, cli_main

EOS = 2
PAGE = pathlib.Path(__file__).resolve().parent / "static" / "demo.html"
COMPLETION_FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "model",
                     "user"}
SCORE_FIELDS = {"input", "model"}
MAX_BODY = 1 << 20


class HTTPError(Exception):
    """An answer other than 200: status and a one-line message (sent as {"error": {"message", "type"}})."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---- requests ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One prompt of a completion request, decoded in one row of a batch."""

    index: int  # choices[].index
    prompt_ids: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    generated: int = 0  # new tokens, `</s>` included
    text: str = ""  # the continuation so far, cut at a stop string
    ready: int = 0  # characters of `text` that are final (not a character or a stop string still arriving)
    sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None


@dataclasses.dataclass
class Completion:
    """A validated /v1/completions request and what its handler waits on."""

    rows: list[Row]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    events: "queue.Queue" = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    id: str = dataclasses.field(default_factory=lambda: "cmpl-" + secrets.token_hex(12))

    @property
    def search_key(self) -> tuple:
        """Requests decode together only when the compiled search is the same."""
        return (self.temperature > 0, self.temperature, self.top_k, self.top_p)


def _number(body: dict, name: str, kind, default, lo=None, hi=None):
    value = body.get(name, default)
    if value is None:
        value = default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise HTTPError(400, f"{name} must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise HTTPError(400, f"{name} must be a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise HTTPError(400, f"{name}={value} is out of range [{lo}, {hi}]")
    return kind(value)


def _check_fields(body, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HTTPError(400, f"unknown field(s) {', '.join(unknown)}: this server takes {', '.join(sorted(allowed))}")


def _texts(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        return value
    raise HTTPError(400, f"{name} must be a string or a non-empty list of strings")


# ---- the model side ---------------------------------------------------------------------------------------


class Engine:
    """The loaded model and its decode batches. `lm` is a `m11b_jax.LanguageModel`."""

    def __init__(self, lm, *, max_batch_size: int, max_new_tokens_limit: int):
        self.lm = lm
        self.max_batch_size = max_batch_size
        self.max_new_tokens_limit = max_new_tokens_limit
        self.cancelled_rows = 0  # rows ended because their client went away

    def completion(self, body) -> Completion:
        """Validate a /v1/completions body into a Completion (HTTPError 400 for what is wrong)."""
        _check_fields(body, COMPLETION_FIELDS)
        if "prompt" not in body:
            raise HTTPError(400, "prompt is required")
        prompts = _texts(body["prompt"], "prompt")
        n = _number(body, "n", int, 1)
        if n != 1:
            raise HTTPError(400, f"n={n}: this server returns one choice per prompt (n=1); send the prompt n times")
        if len(prompts) > self.max_batch_size:
            raise HTTPError(400, f"{len(prompts)} prompts in one request > --max-batch-size {self.max_batch_size}")
        max_tokens = _number(body, "max_tokens", int, 16, 1, None)
        if max_tokens > self.max_new_tokens_limit:
            raise HTTPError(400, f"max_tokens={max_tokens} is above this server's limit "
                                 f"{self.max_new_tokens_limit}: ask for fewer")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise HTTPError(400, "stop must be a non-empty string or a list of at most 4 non-empty strings")
        seed = body.get("seed")
        seed = secrets.randbits(31) if seed is None else _number(body, "seed", int, 0, 0, 2**31 - 1)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise HTTPError(400, f"stream must be true or false, got {stream!r}")
        rows = []
        for i, text in enumerate(prompts):
            ids = self.lm.encode(text)
            if len(ids) + max_tokens > self.lm.cfg.max_positions:
                raise HTTPError(400, f"prompt {i} has {len(ids)} tokens; with max_tokens={max_tokens} that is more "
                                     f"than the model's {self.lm.cfg.max_positions} positions: shorten the prompt "
                                     "or lower max_tokens")
            rows.append(Row(i, ids))
        return Completion(rows, max_tokens, _number(body, "temperature", float, 1.0, 0.0, 100.0),
                          _number(body, "top_k", int, 0, 0, self.lm.cfg.vocab_size),
                          _number(body, "top_p", float, 1.0, 1e-6, 1.0), seed, stop, stream)

    def decode_batch(self, batch: Sequence[Completion]) -> None:
        """Decode every row of `batch` (same search_key) in one generator call, streaming tokens as they come."""
        from m11b_jax.generation import SearchOptions

        rows = [(c, r) for c in batch for r in c.rows]
        first = batch[0]
        sampling = first.temperature > 0
        # Every batch decodes up to the server's limit (the listener ends each row at its own max_tokens), so the
        # cache length and the compiled search depend only on the batch size and the prompt length bucket.
        room = self.lm.cfg.max_positions - max(len(r.prompt_ids) for _, r in rows)
        opts = SearchOptions(max_new_tokens=min(self.max_new_tokens_limit, room), sampling=sampling,
                             temperature=first.temperature if sampling else 1.0,
                             top_k=first.top_k if sampling else 0, top_p=first.top_p if sampling else 1.0)

        pad = self.lm.cfg.pad_idx

        def listener(step: int, tokens: np.ndarray, done: np.ndarray) -> np.ndarray:
            """After each step: take the new tokens (pad marks a row that had already ended), say which rows stop."""
            stop = np.ones(len(tokens), dtype=bool)  # rows past the requests stop at once
            for i, (c, r) in enumerate(rows):
                if r.finish_reason is None and tokens[i] != pad:
                    self._advance(c, r, int(tokens[i]))
                stop[i] = r.finish_reason is not None
            return stop

        try:
            self.lm.generator.generate([r.prompt_ids for _, r in rows], opts, batch_size=len(rows),
                                       seeds=[c.seed for c, _ in rows], listener=listener)
        except Exception as e:  # noqa: BLE001  every waiting client gets the error; the server keeps serving
            for c in batch:
                c.events.put(("error", f"decoding failed: {type(e).__name__}: {e}"))
            return
        for c, r in rows:
            if r.finish_reason is None:  # the search ended (its own cap) before the listener closed the row
                r.finish_reason = "length"
                c.events.put(("token", r))
        for c in batch:
            c.events.put(("done", None))

    def _advance(self, c: Completion, r: Row, token: int) -> None:
        """Take one new token of row r: update its text, find stop strings and limits, stream the change."""
        if c.cancelled.is_set():
            r.finish_reason = "cancelled"
            self.cancelled_rows += 1
            return
        r.generated += 1
        if token == EOS:
            r.finish_reason = "stop"
        else:
            r.tokens.append(token)
            text = self.lm.decode(r.tokens)
            cuts = [i for i in (text.find(s) for s in c.stop) if i >= 0]
            if cuts:
                text, r.finish_reason = text[:min(cuts)], "stop"
            r.text = text
            if r.finish_reason is None and r.generated >= c.max_tokens:
                r.finish_reason = "length"
        r.ready = len(r.text) if r.finish_reason else len(r.text) - _held_back(r.text, c.stop)
        c.events.put(("token", r))

    def score(self, body) -> dict:
        _check_fields(body, SCORE_FIELDS)
        if "input" not in body:
            raise HTTPError(400, "input is required")
        texts = _texts(body["input"], "input")
        try:
            results = self.lm.score(texts)
        except UserError as e:
            raise HTTPError(400, str(e)) from None
        data = []
        for i, res in enumerate(results):
            ids = res["tokens"]
            data.append({"index": i, "token_ids": ids, "tokens": [self._piece(t) for t in ids],
                         "token_logprobs": res["logprobs"], "total_logprob": res["total"]})
        return {"object": "list", "data": data}

    def _piece(self, token: int) -> str:
        return "</s>" if token == EOS else self.lm.decode([token])


# ---- batching ---------------------------------------------------------------------------------------------


class Scheduler:
    """A bounded queue of completions and one thread that decodes them in batches."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.batches = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="m11b-scheduler", daemon=True)
        self._thread.start()

    @property
    def cancelled_rows(self) -> int:
        return getattr(self.engine, "cancelled_rows", 0)

    def submit(self, c: Completion) -> None:
        try:
            self.queue.put_nowait(c)
        except queue.Full:
            raise HTTPError(429, f"the server's queue is full ({self.queue.maxsize} requests): retry later") from None

    def close(self, timeout: float = 60.0) -> None:
        """Finish the batch in flight, then stop the thread (queued requests are not decoded)."""
        self._closing = True
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def _run(self) -> None:
        pending: list[Completion] = []
        while not self._closing:
            if not pending:
                pending.append(self.queue.get())
            while True:  # everything that has arrived joins this batch
                try:
                    pending.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            pending = [c for c in pending if c is not None and not c.cancelled.is_set()]
            if self._closing:
                break
            if not pending:
                continue
            key = pending[0].search_key
            batch, rest, nrows = [], [], 0
            for c in pending:
                if c.search_key == key and nrows + len(c.rows) <= self.engine.max_batch_size:
                    batch.append(c)
                    nrows += len(c.rows)
                else:
                    rest.append(c)
            pending = rest
            self.batches += 1
            self.engine.decode_batch(batch)


# ---- HTTP -------------------------------------------------------------------------------------------------


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of an unfinished text that may still change: an incomplete UTF-8 character (shown
    as U+FFFD until its last byte arrives) or the start of a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def _choice(r: Row, text: str, finish_reason) -> dict:
    return {"index": r.index, "text": text, "logprobs": None, "finish_reason": finish_reason}


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "m11b-jax"
    protocol_version = "HTTP/1.1"

    # set on the class by make_server
    engine: Engine
    scheduler: Scheduler
    model_name: str

    def log_message(self, fmt, *args):  # one line per request on stderr, as http.server does, but quieter
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    def _send(self, status: int, payload, content_type: str = "application/json") -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        kind = {400: "invalid_request_error", 404: "not_found", 413: "invalid_request_error",
                429: "rate_limit_error"}.get(status, "server_error")
        self._send(status, {"error": {"message": message, "type": kind}})

    def _body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HTTPError(400, "send the JSON body with a Content-Length header")
        if int(length) > MAX_BODY:
            raise HTTPError(413, f"the body has {length} bytes > {MAX_BODY}: send less")
        raw = self.rfile.read(int(length))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise HTTPError(400, f"the body is not UTF-8 (byte {e.start}): send UTF-8 JSON") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise HTTPError(400, f"the body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None

    def do_GET(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, {"status": "ok", "model": self.model_name, "queued": self.scheduler.queue.qsize(),
                             "batches": self.scheduler.batches})
        elif path in ("/", "/index.html"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        else:
            self._error(404, f"no page {path}: try /, /health, POST /v1/completions or POST /v1/score")

    def do_POST(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        try:
            if path == "/v1/completions":
                c = self.engine.completion(self._body())
                self.scheduler.submit(c)
                (self._stream if c.stream else self._complete)(c)
            elif path == "/v1/score":
                self._send(200, self.engine.score(self._body()))
            else:
                raise HTTPError(404, f"no endpoint {path}: POST /v1/completions or /v1/score")
        except HTTPError as e:
            self._error(e.status, str(e))
        except UserError as e:
            self._error(400, str(e))

    def _wait(self, c: Completion):
        """Events of c until it is done: ("token", row) as rows change; raises on a decoding error."""
        while True:
            kind, value = c.events.get()
            if kind == "done":
                return
            if kind == "error":
                raise HTTPError(500, value)
            yield value

    def _complete(self, c: Completion) -> None:
        for _ in self._wait(c):
            pass
        self._send(200, {"id": c.id, "object": "text_completion", "created": c.created, "model": self.model_name,
                         "choices": [_choice(r, r.text, r.finish_reason) for r in c.rows],
                         "usage": _usage(c)})

    def _stream(self, c: Completion) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def event(payload) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        head = {"id": c.id, "object": "text_completion", "created": c.created, "model": self.model_name}
        try:
            for r in self._wait(c):
                text, reason = r.text[:r.ready], r.finish_reason
                delta = text[r.sent:]
                if delta or reason:
                    r.sent = len(text)
                    event({**head, "choices": [_choice(r, delta, reason)]})
            event({**head, "choices": [], "usage": _usage(c)})
            event("[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            c.cancelled.set()  # the decode loop frees the row at its next step
        except HTTPError as e:
            try:
                event({"error": {"message": str(e), "type": "server_error"}})
            except (BrokenPipeError, ConnectionResetError):
                pass


def _usage(c: Completion) -> dict:
    prompt = sum(len(r.prompt_ids) for r in c.rows)
    new = sum(r.generated for r in c.rows)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    verbose = False

    def close(self) -> None:
        """Stop serving (call from another thread than serve_forever's), let the decode in flight end."""
        self.shutdown()
        self.server_close()
        self.RequestHandlerClass.scheduler.close()


def make_server(lm, *, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 16,
                max_new_tokens_limit: int = 256, max_queue: int = 64, model_name: str = "m11b") -> Server:
    """A server over a loaded LanguageModel (not yet serving: call serve_forever, e.g. in a thread)."""
    if max_batch_size < 1 or max_new_tokens_limit < 1 or max_queue < 1:
        raise UserError("--max-batch-size, --max-new-tokens-limit and --max-queue must be >= 1")
    engine = Engine(lm, max_batch_size=max_batch_size, max_new_tokens_limit=max_new_tokens_limit)
    handler = type("BoundHandler", (Handler,), {"engine": engine, "scheduler": Scheduler(engine, max_queue),
                                                "model_name": model_name})
    try:
        return Server((host, port), handler)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host") from None


def warm_up(lm, max_batch_size: int, max_new_tokens_limit: int, log=print) -> None:
    """Compile the decode of a short prompt (up to 16 tokens) for every batch size bucket up to max_batch_size."""
    from m11b_jax.generation import SearchOptions

    rows = 1
    while True:
        t0 = time.perf_counter()
        opts = SearchOptions(max_new_tokens=min(max_new_tokens_limit, lm.cfg.max_positions - 1))
        lm.generator.generate([[EOS]] * rows, opts, batch_size=rows, seeds=[0] * rows,
                              listener=lambda s, t, d: np.ones(len(t), bool))
        log(f"compiled the decode of {rows} row(s) in {time.perf_counter() - t0:.1f} s")
        if rows >= max_batch_size:
            break
        rows = min(rows * 2, max_batch_size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m m11b_jax.serve", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="checkpoint directory (converted with --bpe-dir, or trained)")
    p.add_argument("--bpe-dir", help="encoder.json and vocab.bpe, when the checkpoint does not carry them")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-parallel-size", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows decoded together (default %(default)s)")
    p.add_argument("--max-new-tokens-limit", type=int, default=256, help="largest max_tokens accepted")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; 429 beyond")
    p.add_argument("--no-warmup", action="store_true", help="compile on the first requests instead of at start-up")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    from m11b_jax.api import LanguageModel

    t0 = time.perf_counter()
    lm = LanguageModel.load(a.path, model_parallel_size=a.model_parallel_size, dtype=a.dtype, bpe_dir=a.bpe_dir)
    lm.encode("")  # text needs dict.txt and the BPE files: say so now, not at the first request
    print(f"loaded {a.path} in {time.perf_counter() - t0:.1f} s on mesh {dict(lm.mesh.shape)}", file=sys.stderr)
    if not a.no_warmup:
        warm_up(lm, a.max_batch_size, a.max_new_tokens_limit, log=lambda m: print(m, file=sys.stderr))
    server = make_server(lm, host=a.host, port=a.port, max_batch_size=a.max_batch_size,
                         max_new_tokens_limit=a.max_new_tokens_limit, max_queue=a.max_queue,
                         model_name=pathlib.Path(a.path).name)
    print(f"serving on http://{a.host}:{server.server_address[1]}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.RequestHandlerClass.scheduler.close()


if __name__ == "__main__":
    main()

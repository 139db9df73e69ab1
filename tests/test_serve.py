"""`python -m m11b_jax.serve`: the completions API end to end against a tiny checkpoint, batching of concurrent
clients, streaming, scoring, bad input, a client leaving mid-stream, and the demo page in a real browser."""

import concurrent.futures
import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from m11b_jax import LanguageModel
from m11b_jax import sharding
from m11b_jax.param_tree import init_params
from m11b_jax.config import load_config
from m11b_jax.generate import main as generate_main
from m11b_jax.generation import SearchOptions
from m11b_jax.params_io import save_params
from m11b_jax.serve import Completion, HTTPError, Row, Scheduler, make_server

CFG = load_config("tiny", dropout=0.0, attention_dropout=0.0)
PROMPTS = [" the", " of the", " and", " to the of", " in", " a", " is the", " that",
           " for", " on the", " with", " as", " was the", " at", " by the", " it"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, shared_data):
    """A tiny random model with dict.txt (the first 1020 symbols of the release's) and GPT-2's BPE files."""
    root = tmp_path_factory.mktemp("serve")
    lines = (shared_data / "gpt2_bpe" / "dict.txt").read_text().splitlines()[: CFG.vocab_size - 4]
    (root / "dict.txt").write_text("\n".join(lines) + "\n")
    params = init_params(CFG, sharding.make_mesh(1), sharding.logical_rules(), seed=5)
    return save_params(params, root / "ckpt", CFG, dictionary_path=root / "dict.txt",
                       bpe_dir=shared_data / "gpt2_bpe")


@pytest.fixture(scope="module")
def served(ckpt):
    """(LanguageModel, port) of a server running in this process on 8 simulated devices, model-parallel 8."""
    lm = LanguageModel.load(ckpt, model_parallel_size=8)
    server = make_server(lm, port=0, max_batch_size=16, max_new_tokens_limit=64, max_queue=32)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield lm, server.server_address[1], server
    server.close()


def _post(port, path, body, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, (json.loads(payload) if payload else None)


def _stream(port, body):
    """(text, finish_reason, events) of a streamed completion."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = [e[len("data: "):] for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["text"] for e in chunks for c in e["choices"])
    reasons = [c["finish_reason"] for e in chunks for c in e["choices"] if c["finish_reason"]]
    return text, reasons, chunks


def _cli(ckpt, prompt, capsys, tmp_path, *flags):
    (tmp_path / "prompt.txt").write_text(prompt + "\n")
    generate_main(["--path", str(ckpt), "--input", str(tmp_path / "prompt.txt"), "--model-parallel-size", "8",
                   "--json", *flags])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("options,flags", [
    ({"temperature": 0}, []),
    ({"temperature": 0.8, "top_k": 50, "top_p": 0.9, "seed": 7},
     ["--sampling", "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "7"]),
])
def test_completion_equals_generate_cli(served, ckpt, capsys, tmp_path, options, flags):
    """A completion is what `python -m m11b_jax.generate` gives with the same options; streaming gives the same text."""
    lm, port, _ = served
    status, out = _post(port, "/v1/completions", {"prompt": " of the", "max_tokens": 12, **options})
    assert status == 200, out
    ref = _cli(ckpt, " of the", capsys, tmp_path, "--max-new-tokens", "12", *flags)
    choice = out["choices"][0]
    assert choice["text"] == ref["text"]
    assert choice["finish_reason"] == ("stop" if ref["tokens"][-1:] == [2] else "length")
    assert out["usage"] == {"prompt_tokens": len(ref["prompt_ids"]), "completion_tokens": len(ref["tokens"]),
                            "total_tokens": len(ref["prompt_ids"]) + len(ref["tokens"])}
    text, reasons, chunks = _stream(port, {"prompt": " of the", "max_tokens": 12, **options})
    assert text == ref["text"] and reasons == [choice["finish_reason"]]
    assert len(chunks) > 2  # token by token, not one blob
    assert chunks[-1]["usage"] == out["usage"]


def test_score_equals_eval_lm(served):
    """/v1/score gives eval_lm's per-token log-probs (one window over `</s>` + the text + `</s>`)."""
    from m11b_jax.eval_lm import ContextWindows, evaluate

    lm, port, _ = served
    status, out = _post(port, "/v1/score", {"input": [" the of and to", " in a"]})
    assert status == 200, out
    for row, text in zip(out["data"], [" the of and to", " in a"]):
        stream = np.asarray(lm.encode(text)[1:] + [2], np.int32)
        ref = evaluate(lm.params, lm.cfg, stream, ContextWindows(len(stream), 32, 0), lm.mesh, lm.rules,
                       batch_size=1).token_logprobs
        assert row["token_ids"] == stream.tolist()
        np.testing.assert_allclose(row["token_logprobs"], ref, atol=1e-5)
        assert row["tokens"][-1] == "</s>" and "".join(row["tokens"][:-1]) == text


def test_sixteen_concurrent_clients_get_their_own_continuations(served):
    """16 clients at once (greedy): each gets exactly what its prompt gives alone; the server batched them."""
    lm, port, server = served
    alone = {p: lm.decode(lm.generator.generate([lm.encode(p)], SearchOptions(max_new_tokens=10))[0].tokens)
             for p in PROMPTS}
    batches_before = server.RequestHandlerClass.scheduler.batches
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: _post(port, "/v1/completions",
                                                {"prompt": p, "max_tokens": 10, "temperature": 0}), PROMPTS))
    assert all(status == 200 for status, _ in results)
    assert {p: out["choices"][0]["text"] for p, (_, out) in zip(PROMPTS, results)} == alone
    assert server.RequestHandlerClass.scheduler.batches - batches_before < len(PROMPTS)  # batched, not one by one


def test_client_leaving_mid_stream_frees_its_row(served):
    lm, port, server = served
    scheduler = server.RequestHandlerClass.scheduler
    before = scheduler.cancelled_rows
    body = json.dumps({"prompt": " the", "max_tokens": 64, "temperature": 0.7, "seed": 1, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"data: " not in received:  # the headers, then the first event
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    sock.close()
    deadline = time.time() + 120
    while scheduler.cancelled_rows == before and time.time() < deadline:
        time.sleep(0.05)
    assert scheduler.cancelled_rows == before + 1
    status, out = _post(port, "/v1/completions", {"prompt": " a", "max_tokens": 3, "temperature": 0})
    assert status == 200 and out["choices"][0]["finish_reason"] in ("stop", "length")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["status"] == "ok"


@pytest.mark.parametrize("body,raw,status,words", [
    (None, b"{not json", 400, "not valid JSON"),
    (None, b'{"prompt": "\xff\xfe"}', 400, "not UTF-8"),
    ({"prompt": "x", "max_tokens": 2, "logprobs": 5}, None, 400, "unknown field(s) logprobs"),
    ({"prompt": "x", "max_tokens": 65}, None, 400, "above this server's limit 64"),
    ({"prompt": " the" * 120, "max_tokens": 16}, None, 400, "positions"),
    ({"prompt": "x", "n": 2}, None, 400, "n=2"),
    ({"max_tokens": 2}, None, 400, "prompt is required"),
    ({"prompt": "x", "temperature": "hot"}, None, 400, "temperature must be a number"),
    ({"prompt": "x", "stop": 3}, None, 400, "stop must be"),
    ({"input": 5}, None, 400, "input must be"),
])
def test_bad_requests_get_one_line_errors(served, body, raw, status, words):
    _, port, _ = served
    path = "/v1/score" if body and "input" in body else "/v1/completions"
    got, out = _post(port, path, body, raw)
    assert got == status and words in out["error"]["message"] and "\n" not in out["error"]["message"]


def test_stop_string_ends_the_completion(served):
    lm, port, _ = served
    _, full = _post(port, "/v1/completions", {"prompt": " the", "max_tokens": 12, "temperature": 0})
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    _, cut = _post(port, "/v1/completions", {"prompt": " the", "max_tokens": 12, "temperature": 0, "stop": stop})
    assert cut["choices"][0] == {**full["choices"][0], "text": text[:text.find(stop)], "finish_reason": "stop"}
    streamed, reasons, _ = _stream(port, {"prompt": " the", "max_tokens": 12, "temperature": 0, "stop": [stop]})
    assert streamed == text[:text.find(stop)] and reasons == ["stop"]


def test_full_queue_answers_429():
    """More requests than the queue holds while a batch decodes: 429 for the rest, the queued ones still run."""
    release, ran = threading.Event(), []

    class SlowEngine:
        max_batch_size = 1

        def decode_batch(self, batch):
            release.wait(30)
            ran.extend(batch)

    scheduler = Scheduler(SlowEngine(), max_queue=2)
    make = lambda: Completion([Row(0, [2])], 1, 0.0, 0, 1.0, 0, [], False)  # noqa: E731
    scheduler.submit(make())  # taken by the scheduler thread, which then blocks in decode_batch
    deadline = time.time() + 10
    while scheduler.queue.qsize() and time.time() < deadline:
        time.sleep(0.01)
    scheduler.submit(make())
    scheduler.submit(make())
    with pytest.raises(HTTPError) as e:
        scheduler.submit(make())
    assert e.value.status == 429 and "queue is full" in str(e.value)
    release.set()
    deadline = time.time() + 10
    while len(ran) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert len(ran) == 3


def _browser_binaries():
    """Debian's chromium and its driver; installed here with apt-get when missing and we are root (CI)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")) and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], env=env, check=False,
                       capture_output=True)
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: apt-get install chromium "
                    "chromium-driver")
    return chromium, driver


def test_demo_page_in_a_real_browser(served, tmp_path):
    """Headless Chromium opens /, types a prompt, clicks Generate: the page shows the API's continuation and the
    coloured per-token log-probs."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    lm, port, _ = served
    chromium, driver_path = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.ID, "prompt").send_keys(" of the")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 240).until(lambda d: d.find_element(By.ID, "scored").text)
        shown = driver.find_element(By.ID, "continuation").text
        status = driver.find_element(By.ID, "status").text
        spans = driver.find_elements(By.CSS_SELECTOR, "#scored span")
        driver.save_screenshot(str(tmp_path / "demo.png"))
    finally:
        driver.quit()
    _, api = _post(port, "/v1/completions", {"prompt": " of the", "max_tokens": 32, "temperature": 0, "seed": 0})
    assert status.startswith("done")
    assert shown == api["choices"][0]["text"].strip() or shown == api["choices"][0]["text"]
    assert len(spans) == len(lm.encode(" of the" + api["choices"][0]["text"]))

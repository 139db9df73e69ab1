"""Serving throughput on this CPU: 16 concurrent clients vs the same 16 requests one at a time.

    python benchmarks/bench_serve.py [--clients 16] [--max-tokens 32] [--d-model 256] [--layers 4]
        [--screenshot benchmarks/serve_demo.png]
    python benchmarks/bench_serve.py --arch transformer_lm_megatron_11b --dtype bfloat16   # on one GPU: the 11B

A random model (GPT-2 BPE, the first vocab - 4 symbols of ../shared/data's dict.txt, or dict.51200.txt for the
release's vocabulary), made on one device as a `LanguageModel`, is served by `m11b_jax.serve` in this process (buckets compiled at
start-up). Each client sends one greedy completion of `--max-tokens` new tokens (a `stop` that never matches keeps
every row going to its limit). Prints one JSON object: tokens/s one at a time, tokens/s with all clients at
once, their ratio (the goal: >= 4), batches the scheduler ran, and the time to the first streamed token of a
request alone and of one among all clients. With --screenshot, headless Chromium opens the demo page, types a
prompt, clicks Generate and saves what it shows.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import pathlib
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = pathlib.Path(os.environ.get("M11B_DATA_DIR", REPO.parent / "shared" / "data"))
PROMPTS = [" the", " of the", " and", " to the of", " in", " a", " is the", " that",
           " for", " on the", " with", " as", " was the", " at", " by the", " it"]


def _post(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def _first_token_s(port, body) -> float:
    """Seconds from sending a streamed request to its first event carrying text."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    for line in resp:
        if line.startswith(b"data: {") and first is None and json.loads(line[6:])["choices"]:
            first = time.perf_counter() - t0
    conn.close()
    return first


def screenshot(port: int, path: pathlib.Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,820"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.ID, "prompt").send_keys("The history of the city")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 300).until(lambda d: d.find_element(By.ID, "scored").text)
        driver.save_screenshot(str(path))
    finally:
        driver.quit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--arch", help="a config name instead of the small model (random weights of that size)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--screenshot", type=pathlib.Path)
    a = p.parse_args()

    import jax

    from m11b_jax import LanguageModel
    from m11b_jax import sharding
    from m11b_jax.param_tree import init_params
    from m11b_jax.config import load_config
    from m11b_jax.dictionary import Dictionary
    from m11b_jax.serve import make_server, warm_up
    from m11b_jax.tokenizer import GPT2BPE

    if a.arch:
        cfg = load_config(a.arch, dropout=0.0, attention_dropout=0.0, param_dtype=a.dtype, compute_dtype=a.dtype)
    else:
        cfg = load_config("tiny", d_model=a.d_model, ffn_dim=4 * a.d_model, num_layers=a.layers, num_heads=4,
                          max_positions=256, dropout=0.0, attention_dropout=0.0)
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_serve_"))
    dict_file = "dict.51200.txt" if cfg.vocab_size == 51200 else "dict.txt"
    lines = (DATA / "gpt2_bpe" / dict_file).read_text().splitlines()[: cfg.vocab_size - 4]
    (root / "dict.txt").write_text("\n".join(lines) + "\n")
    mesh, rules = sharding.make_mesh(1, jax.devices()[:1]), sharding.logical_rules()
    params = init_params(cfg, mesh, rules, seed=0)  # made on the device: the 11B is never on the host
    lm = LanguageModel(cfg, params, mesh, rules, Dictionary.load(root / "dict.txt"),
                       GPT2BPE.from_files(DATA / "gpt2_bpe" / "encoder.json", DATA / "gpt2_bpe" / "vocab.bpe"))
    t0 = time.perf_counter()
    warm_up(lm, a.clients, a.max_tokens, log=lambda m: None)
    compile_s = time.perf_counter() - t0
    server = make_server(lm, port=0, max_batch_size=a.clients, max_new_tokens_limit=a.max_tokens,
                         max_queue=4 * a.clients)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    prompts = (PROMPTS * (a.clients // len(PROMPTS) + 1))[: a.clients]
    body = lambda prompt: {"prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0,  # noqa: E731
                           "stop": "\u2603never\u2603"}
    _post(port, body(prompts[0]))  # one request through the whole path first

    t0 = time.perf_counter()
    alone = [_post(port, body(q)) for q in prompts]
    sequential_s = time.perf_counter() - t0
    batches0 = server.RequestHandlerClass.scheduler.batches
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(a.clients) as pool:
        together = list(pool.map(lambda q: _post(port, body(q)), prompts))
    concurrent_s = time.perf_counter() - t0
    batches = server.RequestHandlerClass.scheduler.batches - batches0
    same = [x["choices"][0]["text"] for x in alone] == [x["choices"][0]["text"] for x in together]
    tokens = sum(x["usage"]["completion_tokens"] for x in together)
    ttft_alone = _first_token_s(port, body(prompts[0]))
    with concurrent.futures.ThreadPoolExecutor(a.clients) as pool:
        ttft_loaded = sorted(pool.map(lambda q: _first_token_s(port, body(q)), prompts))
    if a.screenshot:
        screenshot(port, a.screenshot)
    server.close()
    print(json.dumps({
        "model": {"d_model": cfg.d_model, "layers": cfg.num_layers, "vocab": cfg.vocab_size, "dtype": a.dtype},
        "device": jax.devices()[0].device_kind,
        "clients": a.clients, "max_tokens": a.max_tokens, "warmup_compile_s": round(compile_s, 1),
        "tokens": tokens, "sequential_tokens_per_s": round(tokens / sequential_s, 1),
        "concurrent_tokens_per_s": round(tokens / concurrent_s, 1),
        "throughput_ratio": round(sequential_s / concurrent_s, 2), "goal_ratio": 4.0,
        "concurrent_batches": batches, "same_text_alone_and_together": same,
        "first_token_s_alone": round(ttft_alone, 3),
        "first_token_s_among_all_median": round(ttft_loaded[len(ttft_loaded) // 2], 3),
        "first_token_s_among_all_max": round(ttft_loaded[-1], 3),
    }))


if __name__ == "__main__":
    main()

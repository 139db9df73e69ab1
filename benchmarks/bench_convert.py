"""Converter benchmark: peak RSS and throughput of `python -m m11b_jax.convert` on release-sized layers.

    python benchmarks/bench_convert.py [--layers 4] [--formats legacy,zip] [--dtype float32] [--workdir DIR]

Writes a synthetic release-layout checkpoint (8 fp16 shards, d 3072, ffn 18432, 32 heads, vocab 51200,
`--layers` layers; random weights generated rank by rank, so the generator never holds more than one shard),
converts it in a subprocess under `/usr/bin/time -v`, and reports the converter's peak RSS against
"largest shard + 1 GiB" and its MB/s, then extrapolates both to the 72-layer release:
  - peak RSS: measured peak - largest benchmark shard + largest release shard (the converter holds one
    shard plus per-tensor buffers; the per-tensor sizes of a layer are the same in the release);
  - time: release bytes / measured conversion MB/s (the work is linear in bytes, tensor by tensor).
Everything it writes is removed at the end (about 1.5 GB of shards + 3 GB of output per format).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
D, FFN, HEADS, VOCAB, MP, RELEASE_LAYERS = 3072, 18432, 32, 51200, 8, 72


def shard_bytes(layers: int, mp: int = MP, itemsize: int = 2) -> int:
    """Bytes of one fp16 shard's tensors (split tensors / mp, replicated ones whole)."""
    split = layers * (4 * D * D + 3 * D + 2 * D * FFN + FFN) + VOCAB * D
    replicated = layers * (D + D + 4 * D) + 2 * D
    return (split // mp + replicated) * itemsize


def write_synthetic(directory: pathlib.Path, layers: int, legacy: bool) -> list[pathlib.Path]:
    import torch

    directory.mkdir(parents=True)
    (directory / "dict.txt").write_text("".join(f"{i} {VOCAB - i}\n" for i in range(VOCAB - 4)))
    args = argparse.Namespace(
        arch="transformer_lm_megatron_11b", task="language_modeling", model_parallel_size=MP,
        decoder_embed_dim=D, decoder_input_dim=D, decoder_output_dim=D, decoder_ffn_embed_dim=FFN,
        decoder_layers=layers, decoder_attention_heads=HEADS, share_decoder_input_output_embed=True,
        decoder_learned_pos=False, no_decoder_final_norm=False, activation_fn="gelu", dropout=0.1,
        attention_dropout=0.1, tokens_per_sample=1024, max_target_positions=1024,
        criterion="vocab_parallel_cross_entropy", fp16=True)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).half()  # noqa: E731
    replicated = {}
    for i in range(layers):
        for name in ("self_attn.out_proj.bias", "fc2.bias", "self_attn_layer_norm.weight",
                     "self_attn_layer_norm.bias", "final_layer_norm.weight", "final_layer_norm.bias"):
            replicated[f"decoder.layers.{i}.{name}"] = rnd(D) + (1 if name.endswith("norm.weight") else 0)
    replicated["decoder.layer_norm.weight"], replicated["decoder.layer_norm.bias"] = 1 + rnd(D), rnd(D)
    paths = []
    for r in range(MP):
        sd = collections.OrderedDict()
        sd["decoder.version"] = torch.tensor([3.0]).half()
        sd["decoder.embed_tokens.weight"] = rnd(VOCAB // MP, D)
        sd["decoder.embed_positions._float_tensor"] = torch.zeros(1).half()
        for i in range(layers):
            p = f"decoder.layers.{i}."
            for proj in "kvq":
                sd[p + f"self_attn.{proj}_proj.weight"] = rnd(D // MP, D)
                sd[p + f"self_attn.{proj}_proj.bias"] = rnd(D // MP)
            sd[p + "self_attn.out_proj.weight"] = rnd(D, D // MP)
            sd[p + "fc1.weight"], sd[p + "fc1.bias"] = rnd(FFN // MP, D), rnd(FFN // MP)
            sd[p + "fc2.weight"] = rnd(D, FFN // MP)
        sd.update(replicated)
        path = directory / f"model-model_part-{r}.pt"
        torch.save({"args": args, "model": sd, "optimizer_history": [], "extra_state": {}}, path,
                   _use_new_zipfile_serialization=not legacy)
        paths.append(path)
        del sd
    return paths


def timed_run(cmd: list[str]) -> tuple[int, float, str]:
    """(peak RSS bytes, wall seconds, stderr) of a command under /usr/bin/time -v."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return rss_kb * 1024, wall, proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--formats", default="legacy,zip", help="comma-separated: legacy (release) and/or zip")
    ap.add_argument("--dtype", default="float32", help="converter --dtype")
    ap.add_argument("--workdir", default=None, help="where to write the temporary files (default: system temp)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()

    GiB, MB = 2**30, 1e6
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_convert-", dir=a.workdir))
    results = {"layers": a.layers, "dtype": a.dtype, "cpus": os.cpu_count(), "runs": {}}
    try:
        rss_imports, _, _ = timed_run([sys.executable, "-c", "import m11b_jax.convert, torch"])
        results["rss_imports_bytes"] = rss_imports
        for fmt in a.formats.split(","):
            src, out = work / f"src-{fmt}", work / f"out-{fmt}"
            t0 = time.perf_counter()
            paths = write_synthetic(src, a.layers, legacy=(fmt == "legacy"))
            gen = time.perf_counter() - t0
            sizes = [p.stat().st_size for p in paths]
            peak, wall, log = timed_run([sys.executable, "-m", "m11b_jax.convert", str(src), str(out),
                                         "--dtype", a.dtype])
            m = re.search(r"converted (\d+) MiB in ([\d.]+) s", log)
            convert_s = float(m.group(2))
            total = sum(sizes)
            largest = max(sizes)
            release_shard = shard_bytes(RELEASE_LAYERS) + (largest - shard_bytes(a.layers))  # + pickle overhead
            run = {
                "generate_s": round(gen, 1), "shard_bytes": sizes, "total_bytes": total, "largest_shard": largest,
                "peak_rss": peak, "bound": largest + GiB, "within_bound": peak <= largest + GiB,
                "wall_s": round(wall, 1), "convert_s": convert_s,
                "mb_per_s_convert": round(total / MB / convert_s, 1), "mb_per_s_wall": round(total / MB / wall, 1),
                "output_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
                "release_largest_shard": release_shard,
                "release_peak_rss_est": peak - largest + release_shard,
                "release_bound": release_shard + GiB,
                "release_total_bytes": release_shard * MP,
            }
            run["release_convert_s_est"] = round(run["release_total_bytes"] / MB / run["mb_per_s_convert"], 0)
            results["runs"][fmt] = run
            print(f"[{fmt}] {a.layers} layers: {total / GiB:.2f} GiB in {MP} shards (largest {largest / GiB:.3f} GiB); "
                  f"peak RSS {peak / GiB:.3f} GiB vs bound {(largest + GiB) / GiB:.3f} GiB "
                  f"({'OK' if run['within_bound'] else 'OVER'}); convert {convert_s:.1f} s = "
                  f"{run['mb_per_s_convert']} MB/s (wall {wall:.1f} s = {run['mb_per_s_wall']} MB/s)", flush=True)
            print(f"[{fmt}] 72-layer release estimate: largest shard {release_shard / GiB:.2f} GiB, peak RSS "
                  f"{run['release_peak_rss_est'] / GiB:.2f} GiB vs bound {run['release_bound'] / GiB:.2f} GiB; "
                  f"{run['release_total_bytes'] / GiB:.1f} GiB in {run['release_convert_s_est'] / 60:.1f} min", flush=True)
            shutil.rmtree(src)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"import-only RSS (python + torch + jax + m11b_jax): {results['rss_imports_bytes'] / GiB:.3f} GiB")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

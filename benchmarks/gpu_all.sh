#!/usr/bin/env bash
# The one prepared GPU run for a session lent an H100/H200 (device tool: one call, timeout_s ~570): every GPU figure
# the open issues ask for, as JSON lines, each part under its own time limit so one slow part cannot lose the rest.
#
# Here, before the call (the device machine has the repo only, not ../shared):
#   mkdir -p .gpu_data && cp -r ../shared/data/gpt2_bpe .gpu_data/ && echo /.gpu_data/ >> .git/info/exclude
# then run, carrying .gpu_data (and .whl if jax's CUDA wheels must travel, see the device tool's README):
#   bash benchmarks/gpu_all.sh            # results under $OUT (the device tool's folder) or ./gpu_out
#
#   part        issue  what
#   mfu_sweep   16     matmul ceiling, attention fwd+bwd (XLA / cudnn / flash), 1.3B steps, MFU, a profile
#   decode      13     the 11B in bf16, greedy, batch 1, ms/token against weight bytes / bandwidth
#   precision   15     the 1.3B step under bf16, fp16 (loss scaling), memory-efficient fp16/bf16
#   serve       19     the 11B in bf16 behind the HTTP server: tokens/s at 1 and 16 concurrent clients
set -u
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 M11B_DATA_DIR="${M11B_DATA_DIR:-$PWD/.gpu_data}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/{"card": "/; s/$/"}/'

part() {  # part NAME SECONDS COMMAND...: JSON lines to stdout and $out/NAME.jsonl, stderr to $out/NAME.err
  local name=$1 limit=$2
  shift 2
  echo "{\"part\": \"$name\", \"limit_s\": $limit}"
  timeout "$limit" "$@" 2>"$out/$name.err" | tee "$out/$name.jsonl"
  echo "{\"part\": \"$name\", \"exit\": ${PIPESTATUS[0]}}"
}

part mfu_sweep 270 python benchmarks/gpu_mfu_sweep.py --budget-s 240
part decode 80 python benchmarks/gpu_decode.py --new-tokens 128 --bandwidth-gbs 4800
part precision 70 python benchmarks/gpu_train.py --skip-11b --variants "" --budget-s 60
part serve 140 python benchmarks/bench_serve.py --arch transformer_lm_megatron_11b --dtype bfloat16 \
    --clients 16 --max-tokens 32

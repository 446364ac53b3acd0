#!/usr/bin/env bash
# One GPU measurement run, for a session lent a device (see docs/perf.md). Run from the repo root
# on the device machine with the release binary carried over (target/release/hifi-tuner):
#   bash scripts/device_bench.sh           # writes $OUT/bench.jsonl, $OUT/nvidia-smi.txt, $OUT/peak_mib.txt
# The binary's rpath points at this repo's .venv; on the device, libtorch comes from its torch.
set -euo pipefail
OUT=${OUT:-/tmp/hifi-bench}
mkdir -p "$OUT"
TORCH_LIB=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BIN=target/release/hifi-tuner
nvidia-smi > "$OUT/nvidia-smi.txt"
MODEL=/tmp/sd15-random
[ -d "$MODEL" ] || $BIN init-random --config sd15 --tokenizer tests/fixtures/tokenizers/clip --out "$MODEL" --fp16 --seed 0
# Sample the GPU's memory use every 100 ms while the bench runs; the peak is the largest sample.
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/memory_samples.txt" &
SMI=$!
$BIN bench --model "$MODEL" --steps 50 --learn-steps 20 --device cuda | tee "$OUT/bench.jsonl"
kill $SMI
sort -n "$OUT/memory_samples.txt" | tail -1 > "$OUT/peak_mib.txt"
echo "peak GPU memory (MiB, all processes): $(cat "$OUT/peak_mib.txt")"

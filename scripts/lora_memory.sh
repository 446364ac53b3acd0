#!/usr/bin/env bash
# Peak memory of a DreamBooth-LoRA step against a full DreamBooth step (issue 20), on an
# SD-1.5-shaped random model on the CPU (512×512, batch 1, no prior preservation, float32
# weights, no gradient checkpointing): the peak resident set size of `learn` for 2 steps of
# each mode, measured by GNU time, and their ratio. Run by hand (about 10 minutes, ~20 GB
# free memory): BIN=target/release/hifi-tuner bash scripts/lora_memory.sh
set -euo pipefail
BIN=${BIN:-target/release/hifi-tuner}
W=${W:-/tmp/lora-memory}
rm -rf "$W/lora" "$W/db"
mkdir -p "$W"
[ -f "$W/sd15/model_index.json" ] || $BIN init-random --config sd15 --fp16 --tokenizer tests/fixtures/tokenizers/clip --out "$W/sd15"
common=(--model "$W/sd15" --images tests/fixtures/photos/dog --class-noun dog --steps 2 --no-prior --dtype fp32
  --device cpu --checkpoint-every 0)
peak() { # MODE: prints the peak RSS in MB
  /usr/bin/time -v "$BIN" learn --mode "$1" "${common[@]}" --out "$W/$1" > /dev/null 2> "$W/$1.log"
  awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$W/$1.log"
}
lora=$(peak lora)
db=$(peak dreambooth)
echo "peak RSS: lora ${lora} MB, dreambooth ${db} MB, dreambooth / lora $(python3 -c "print(round($db / $lora, 2))")"

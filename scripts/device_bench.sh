#!/usr/bin/env bash
# One GPU run for a session lent a device (docs/perf.md): ours and diffusers 0.42.1 on the same
# random SD-1.5-shaped weights at 512², then every subcommand once on CUDA and on the CPU on the
# tiny fixture model, compared (a correctness smoke test: nothing left on the wrong device).
#
# Here (no GPU needed):   make build device-wheels
#   (the device's image has PyTorch 2.11 and transformers, but no diffusers, and fetches nothing:
#    `device-wheels` downloads the pure-Python diffusers 0.42.1 and transformers 5.24.0 wheels
#    into the ignored .wheels/; carry it with the binary)
# On the device, from the repo root, carrying [".wheels", "target/release/hifi-tuner"]:
#   OUT=$OUT bash scripts/device_bench.sh
# Writes $OUT/bench.jsonl, $OUT/smoke.txt, $OUT/perf_section.md (paste into docs/perf.md),
# $OUT/nvidia-smi.txt and $OUT/peak_mib.txt. The binary's rpath points at this repo's .venv;
# on the device libtorch comes from python3's torch.
set -euo pipefail
OUT=${OUT:-/tmp/hifi-bench}
PY=${PY:-python3}
mkdir -p "$OUT"
TORCH_LIB=$($PY -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BIN=target/release/hifi-tuner
# The working tree that travels is capped (64 MiB): the binary may come stripped and xz-packed
# as .devcarry/hifi-tuner.xz, with only the diffusers wheel (the device's transformers 5.x
# loads SD-1.x's CLIP as well; its version is recorded below).
if [ ! -x "$BIN" ] && [ -f .devcarry/hifi-tuner.xz ]; then
  mkdir -p target/release
  $PY -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' .devcarry/hifi-tuner.xz "$BIN"
  chmod +x "$BIN"
fi
nvidia-smi > "$OUT/nvidia-smi.txt"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
WHEELS=.wheels; [ -d "$WHEELS" ] || WHEELS=.devcarry
if ! $PY -c 'import diffusers; assert diffusers.__version__ == "0.42.1"' 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-index --find-links "$WHEELS" diffusers==0.42.1
fi
if ls "$WHEELS"/transformers-5.24.0-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index --find-links "$WHEELS" transformers==5.24.0
fi
$PY -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' | tee "$OUT/versions.txt"

# 1. Speed: ours at fp16 and bf16, diffusers' pipeline at fp16 and bf16 and its TI-step
#    UNet forward + backward, on the same folder.
MODEL=/tmp/sd15-random
[ -d "$MODEL" ] || $BIN init-random --config sd15 --tokenizer assets/tokenizer --out "$MODEL" --fp16 --seed 0
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/memory_samples.txt" &
SMI=$!
: > "$OUT/bench.jsonl"
for dt in fp16 bf16; do
  $BIN bench --model "$MODEL" --steps 50 --learn-steps 20 --device cuda --dtype $dt \
    | sed "s/^{/{\"run\":\"ours-$dt\",/" | tee -a "$OUT/bench.jsonl"
done
$PY scripts/diffusers_bench.py --model "$MODEL" --steps 50 --size 512 | sed 's/^{/{"run":"diffusers",/' | tee -a "$OUT/bench.jsonl"
# 1b. The other backbones at their own sizes (fp16, random weights): SD-2.1 at 768² (v-prediction;
#     every row of bench) and SDXL-base at 1024² (every row too: learning, LoRA, guidance, NTI).
for cfg in sd2 sdxl; do
  M=/tmp/$cfg-random
  [ -d "$M" ] || $BIN init-random --config $cfg --tokenizer assets/tokenizer --out "$M" --fp16 --seed 0
  $BIN bench --model "$M" --steps 50 --learn-steps 10 --device cuda --dtype fp16 \
    | sed "s/^{/{\"run\":\"ours-$cfg-fp16\",/" | tee -a "$OUT/bench.jsonl"
done
kill $SMI
sort -n "$OUT/memory_samples.txt" | tail -1 > "$OUT/peak_mib.txt"

# 2. Smoke: each subcommand on CUDA and on the CPU (fp32 both), outputs compared.
T=tests/fixtures/tiny-a
S=/tmp/hifi-smoke; rm -rf $S; mkdir -p $S
for dev in cpu cuda; do
  $BIN generate --model $T --prompt "a photo of a dog" --steps 10 --seed 1 --device $dev --dtype fp32 --out $S/gen-$dev.png
  $BIN learn --model $T --images tests/fixtures/photos/dog --masks tests/fixtures/photos/dog-masks --class-noun dog \
    --steps 5 --stepwise-steps 1 --ddim-steps 10 --device $dev --dtype fp32 --out $S/subject-$dev >/dev/null
  $BIN generate --model $T --subject $S/subject-$dev --prompt "a photo of a dog" --steps 10 --t-start 8 --t-end 2 \
    --reference-guidance --device $dev --dtype fp32 --out $S/guided-$dev.png
  $BIN replace --model $T --subject $S/subject-$dev --image tests/fixtures/photos/dog/01.jpg --caption "a photo of a dog" \
    --source-word dog --steps 10 --device $dev --dtype fp32 --out $S/replaced-$dev.png >/dev/null
  $BIN dino --model tests/fixtures/dino-tiny --device $dev tests/fixtures/photos/dog/00.jpg > $S/dino-$dev.json
done
$PY - "$S" > "$OUT/smoke.txt" <<'PYEOF'
import json, sys
import numpy as np
from PIL import Image
from safetensors.numpy import load_file
s = sys.argv[1]
# 8-bit images: cuDNN and cuBLAS sum in other orders than the CPU's kernels (and cuDNN may use
# TF32 for convolutions), so pixels may move by a level or two; a mean within 2 levels says it
# is the same image, while a tensor left on the wrong device fails outright.
for name in ["gen", "guided", "replaced"]:
    a = np.asarray(Image.open(f"{s}/{name}-cpu.png"), dtype=np.float64)
    b = np.asarray(Image.open(f"{s}/{name}-cuda.png"), dtype=np.float64)
    d = np.abs(a - b)
    print(f"{name}: mean |cpu - cuda| {d.mean():.3f} levels, max {d.max():.0f}", "OK" if d.mean() <= 2 else "DIFFERS")
a, b = load_file(f"{s}/subject-cpu/subject.safetensors"), load_file(f"{s}/subject-cuda/subject.safetensors")
rel = np.abs(a["c_s"] - b["c_s"]).max() / np.abs(a["c_s"]).max()
print(f"learn c_s: max rel |cpu - cuda| {rel:.2e}", "OK" if rel <= 1e-2 else "DIFFERS")
a, b = json.load(open(f"{s}/dino-cpu.json")), json.load(open(f"{s}/dino-cuda.json"))
d = max(abs(x - y) for x, y in zip(a, b))
print(f"dino: max |cpu - cuda| {d:.2e}", "OK" if d <= 1e-3 else "DIFFERS")
PYEOF
cat "$OUT/smoke.txt"
$PY scripts/perf_table.py "$OUT/bench.jsonl" "$GPU" "$(cat "$OUT/peak_mib.txt")" > "$OUT/perf_section.md"
cat "$OUT/perf_section.md"

#!/usr/bin/env bash
# The world benchmark (docs/experiments.md, Tables 1–2 on the world), end to end:
#   1. the world's dataset (15 held-out subjects: 5 validation, 10 test);
#   2. settings chosen on the 5 VALIDATION subjects only: the `hifi` row under each point of a
#      small grid of the reference-guidance settings the paper leaves open (t_s, the φ_h
#      learning rate), 1 image per prompt; the rule, fixed before any run: the highest mean
#      DINO over the validation subjects (ties: the first in grid order, the current default);
#   3. the TEST table once, with the chosen settings: every method, `copy` and `base`, on the 10
#      test subjects × 4 prompts × IMAGES images (seeds differ), scored with the world's DINO
#      and CLIP (and GT RMSE); then `report` (means with bootstrap intervals over subjects,
#      paired differences) and `world-validity` (do the scores rank the truth first?).
# Units run in PROCS parallel processes per run folder, as a work queue: each process walks
# the units in order and takes the next one that is neither finished nor locked by another
# (benchmark's unit locks), so subjects complete in order and a run cut short by a deadline
# leaves whole subjects first. The validation grid's points run side by side.
#
#   BIN=target/release/hifi-tuner RUN=runs/world PROCS=2 DEVICE=cpu bash scripts/world_benchmark.sh
# (VAL_PROCS / TEST_PROCS: processes per validation grid point / for the test run; default PROCS)
# Everything a run writes is under $RUN; rerunning skips finished units. VAL_DEADLINE and
# TEST_DEADLINE (seconds, default none) stop a phase's processes when they run out (a lent
# GPU's time is counted).
set -euo pipefail
BIN=${BIN:-target/release/hifi-tuner}
RUN=${RUN:-runs/world}
PROCS=${PROCS:-2}
VAL_PROCS=${VAL_PROCS:-$PROCS}
TEST_PROCS=${TEST_PROCS:-$PROCS}
VAL_DEADLINE=${VAL_DEADLINE:-0}
TEST_DEADLINE=${TEST_DEADLINE:-0}
DEVICE=${DEVICE:-cpu}
MODEL=${MODEL:-assets/world-model}
DINO=${DINO:-assets/world-dino}
CLIP=${CLIP:-assets/world-clip}
IMAGES=${IMAGES:-4}
LEARN=${LEARN:-400}
STEPS=${STEPS:-25}
STEPWISE=${STEPWISE:-5}
T_END=${T_END:-5}
DB_CLASS=${DB_CLASS:-20}
# the LoRA rows: diffusers' recipe (rank 4, lr 1e-4) for as many steps as the other rows learn
LORA_STEPS=${LORA_STEPS:-$LEARN}
LORA_LR=${LORA_LR:-1e-4}
METHODS=${METHODS:-ti,ti+mask,ti+mask+reg,ti+mask+reg+stepwise,hifi,db,db+guidance,lora,lora+guidance,copy,base}
# grid points, one per line: name|flags (t_s of STEPS DDIM steps, the φ_h learning rate); the
# first is the current default
GRID=${GRID:-"ts20-lr1e-2|--t-start 20 --guidance-lr 1e-2
ts20-lr3e-2|--t-start 20 --guidance-lr 3e-2
ts15-lr1e-2|--t-start 15 --guidance-lr 1e-2
ts15-lr3e-2|--t-start 15 --guidance-lr 3e-2"}

W=$RUN/world
[ -f "$W/world.json" ] || $BIN world --out "$W" --samples 0
# (VAL / TEST may name fewer subjects: a smoke run)
VAL=${VAL:-$(python3 -c 'import json,sys; print(",".join(json.load(open(sys.argv[1]))["validation"]))' "$W/world.json")}
TEST=${TEST:-$(python3 -c 'import json,sys; print(",".join(json.load(open(sys.argv[1]))["test"]))' "$W/world.json")}
common=(--model "$MODEL" --dataset "$W/dataset" --masks "$W/masks" --dino "$DINO" --clip "$CLIP"
  --caption-template "a {}" --prompts 4 --steps "$STEPS" --guidance 5 --learn-steps "$LEARN"
  --stepwise-steps "$STEPWISE" --t-end "$T_END" --db-class-images "$DB_CLASS" --db-lr 2.5e-5 --lora-steps "$LORA_STEPS" --lora-lr "$LORA_LR" --device "$DEVICE")

queue() { # N, OUT_DIR, then benchmark flags: N processes on one run folder (in the background)
  local n=$1 out=$2; shift 2
  mkdir -p "$(dirname "$out")"
  for i in $(seq 0 $((n - 1))); do
    $BIN benchmark "${common[@]}" --out "$out" "$@" > "$out.proc$i.log" 2>&1 &
  done
}
finish() { # DEADLINE: wait for every background process, stopping them all at the deadline
  local deadline=$1
  if [ "$deadline" -gt 0 ]; then
    ( sleep "$deadline"; echo "deadline of ${deadline}s reached: stopping"; pkill -f "$BIN benchmark" || true ) &
    local guard=$!
    wait $(jobs -p | grep -v "^$guard$") 2>/dev/null || true
    kill "$guard" 2>/dev/null || true
  else
    wait || true
  fi
}

start=$(date +%s)
# 2. validation grid (hifi only)
mkdir -p "$RUN/val"
# SKIP_VAL=1: no grid (e.g. a run of rows without reference guidance): the first point is used
[ -n "${SKIP_VAL:-}" ] && GRID=$(echo "$GRID" | head -1)
[ -n "${SKIP_VAL:-}" ] || while IFS='|' read -r name flags; do
  # shellcheck disable=SC2086
  queue "$VAL_PROCS" "$RUN/val/$name" --subjects "$VAL" --methods hifi --images-per-prompt 1 $flags
done <<< "$GRID"
finish "$VAL_DEADLINE"
export GRID
chosen=$(python3 - "$RUN/val" 2> >(tee "$RUN/val/summary.txt" >&2) <<'EOF'
import glob, json, os, sys
best = None
order = [l.split("|")[0] for l in os.environ["GRID"].splitlines() if l.strip()]
for name in order:
    d = os.path.join(sys.argv[1], name)
    s = [json.load(open(f)) for f in glob.glob(os.path.join(d, "units/*/hifi/scores.json"))]
    if not s:
        continue
    dino = sum(x["dino"] for x in s) / len(s)
    clip_t = sum(x["clip_t"] for x in s) / len(s)
    print(f"validation {name}: {len(s)} subjects, DINO {dino:.4f}, CLIP-T {clip_t:.4f}", file=sys.stderr)
    if best is None or dino > best[0]:
        best = (dino, name)
if best is None:
    print(f"no validation unit finished: keeping the default {order[0]}", file=sys.stderr)
    best = (None, order[0])
print(best[1])
EOF
)
flags=$(echo "$GRID" | awk -F'|' -v n="$chosen" '$1 == n { print $2 }')
echo "chosen on the validation subjects: $chosen ($flags)" | tee "$RUN/chosen.txt"
val_s=$(( $(date +%s) - start ))

# 3. the test table, once
mkdir -p "$RUN/test"
# shellcheck disable=SC2086
queue "$TEST_PROCS" "$RUN/test/run" --subjects "$TEST" --methods "$METHODS" --images-per-prompt "$IMAGES" $flags
finish "$TEST_DEADLINE"
test_s=$(( $(date +%s) - start - val_s ))
echo "validation grid ${val_s}s, test table ${test_s}s, $PROCS process(es) per run on $DEVICE" | tee "$RUN/timing.txt"
[ -n "${NO_REPORT:-}" ] && exit 0
$BIN report "$RUN/test/run" --out "$RUN/test/report"
$BIN world-validity --model "$MODEL" --dino "$DINO" --clip "$CLIP" --split test --steps "$STEPS" --device "$DEVICE" --out "$RUN/validity" > /dev/null

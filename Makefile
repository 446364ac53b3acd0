# hifi-tuner — build, test and demo. Everything the project needs is installed by these rules:
# the PyTorch 2.11.0 wheel (for libtorch) goes into the ignored .venv/ on first use.

SHELL := /bin/bash
VENV := .venv
TORCH_VERSION := 2.11.0
TORCH_STAMP := $(VENV)/.torch-$(TORCH_VERSION)
PY := $(VENV)/bin/python
BIN := target/release/hifi-tuner

# torch-sys reads libtorch's location and C++ ABI from the venv's torch.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: build test test-portable demo world-benchmark fixtures device-wheels clean-venv

$(TORCH_STAMP):
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PY) -c 'import torch; assert torch.__version__.startswith("$(TORCH_VERSION)"), torch.__version__'
	touch $@

build: $(TORCH_STAMP)
	cargo build --release

# One test thread per binary: tch has no per-call torch.Generator, so seeded draws use
# libtorch's global generator, and another test's unseeded draws (random model init) could
# interleave with them. (On 2 cores this costs ~10 %: libtorch already uses both.)
test: $(TORCH_STAMP)
	cargo test --no-fail-fast -- --test-threads=1

# The suite as other CPUs and thread counts compute it: libtorch's kernels at ATEN_CPU_CAPABILITY
# `default` (no vector unit) and `avx2` (an AMD or older Intel CPU without AVX-512), MKL and
# oneDNN held to the same instruction sets, each at OMP_NUM_THREADS 1 and 2 (libtorch reads
# these when it starts, in the test binaries and in the CLI they spawn). Every rounding
# tolerance of the tests is recorded (tests/common: check_tol, check_min, assert_close), and
# scripts/tolerance_margins.py fails when any keeps a margin under 5x over the worst run.
# About 4x `make test`'s time; run it before resolving an issue.
PORTABLE_DIR := target/portable
PORTABLE_RUNS := default-1 default-2 avx2-1 avx2-2
ISA_default := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41
ISA_avx2 := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
test-portable: $(TORCH_STAMP)
	cargo test --no-run
	rm -rf $(PORTABLE_DIR) && mkdir -p $(PORTABLE_DIR)
	@fail=0; for run in $(PORTABLE_RUNS); do \
	  isa=$${run%-*}; threads=$${run#*-}; \
	  case $$isa in default) env="$(ISA_default)";; avx2) env="$(ISA_avx2)";; esac; \
	  echo "== $$env OMP_NUM_THREADS=$$threads (log: $(PORTABLE_DIR)/$$run.out)"; \
	  env $$env OMP_NUM_THREADS=$$threads HIFI_TOL_LOG=$(abspath $(PORTABLE_DIR))/$$run.tsv \
	    cargo test --no-fail-fast -- --test-threads=1 > $(PORTABLE_DIR)/$$run.out 2>&1 || { fail=1; echo "   FAILED:"; grep -E "^test .* FAILED|panicked" $(PORTABLE_DIR)/$$run.out | head -20; }; \
	  grep -E "^test result" $(PORTABLE_DIR)/$$run.out | awk '{p+=$$4; f+=$$6} END {print "   " p " passed, " f " failed"}'; \
	done; \
	$(PY) scripts/tolerance_margins.py $(foreach r,$(PORTABLE_RUNS),$(PORTABLE_DIR)/$(r).tsv) || fail=1; \
	exit $$fail

# The main job: photos + masks -> learn (HiFi Tuner) -> a reference-guided image of the subject.
#   make demo                          the small model trained here on the procedural world
#                                      (assets/world-model): learns a held-out subject from 4
#                                      renders + masks, draws it in 4 new scenes plain and with
#                                      reference guidance, next to the ground truth (strip.png).
#   make demo MODEL=path/to/sd-1.x     text-to-image with a real model (diffusers layout), and with
#     IMAGES=dir MASKS=dir CLASS=noun  the full job on your subject's photos and masks; with
#     PHOTO=file CAPTION=... WORD=noun  also the subject put into PHOTO in place of WORD.
#   make demo MODEL=random             the old smoke run: a tiny RANDOM-weight model (noise images)
#                                      through learn, guided generation and replace.
DEMO_OUT := demo-out
DEMO_PROMPT := a photo of a dog on the beach
WORLD_MODEL := assets/world-model
demo: build
	@mkdir -p $(DEMO_OUT)
	@set -e; if [ -z "$(MODEL)" ]; then \
	  $(BIN) generate --model $(WORLD_MODEL) --prompt "a red cube on the grass" --seed 0 --steps 25 --guidance 5 --num-images 4 --out $(DEMO_OUT)/demo.png; \
	  $(BIN) world-demo --model $(WORLD_MODEL) --subject quartered_ball --out $(DEMO_OUT); \
	  echo "demo images: $(DEMO_OUT)/demo-*.png (\"a red cube on the grass\"), $(DEMO_OUT)/strip.png (rows: the 4 photos; ground truth; base model; HiFi; HiFi + reference guidance)"; \
	elif [ "$(MODEL)" = random ]; then \
	  echo "MODEL=random: a tiny model with RANDOM weights (its images are noise)."; \
	  rm -rf $(DEMO_OUT)/tiny-random $(DEMO_OUT)/subject; \
	  $(BIN) init-random --config tiny --tokenizer tests/fixtures/tokenizers/clip --out $(DEMO_OUT)/tiny-random --seed 0 >/dev/null; \
	  $(BIN) generate --model $(DEMO_OUT)/tiny-random --prompt "$(DEMO_PROMPT)" --seed 0 --steps 20 --out $(DEMO_OUT)/demo.png; \
	  $(BIN) learn --model $(DEMO_OUT)/tiny-random --images tests/fixtures/photos/dog --masks tests/fixtures/photos/dog-masks \
	    --class-noun dog --steps 100 --stepwise-steps 2 --ddim-steps 20 --out $(DEMO_OUT)/subject >/dev/null; \
	  $(BIN) generate --model $(DEMO_OUT)/tiny-random --subject $(DEMO_OUT)/subject --prompt "$(DEMO_PROMPT)" --seed 0 \
	    --steps 20 --t-start 16 --t-end 4 --reference-guidance --save-intermediates --out $(DEMO_OUT)/subject.png; \
	  $(BIN) replace --model $(DEMO_OUT)/tiny-random --subject $(DEMO_OUT)/subject --image tests/fixtures/photos/dog/01.jpg \
	    --caption "a photo of a dog" --source-word dog --steps 20 --save-intermediates --out $(DEMO_OUT)/replaced.png >/dev/null; \
	  echo "demo images: $(DEMO_OUT)/demo.png, $(DEMO_OUT)/subject.png (stages in $(DEMO_OUT)/subject-intermediates/), $(DEMO_OUT)/replaced.png"; \
	else \
	  $(BIN) generate --model "$(MODEL)" --prompt "$(DEMO_PROMPT)" --seed 0 --out $(DEMO_OUT)/demo.png; \
	  if [ -n "$(IMAGES)" ]; then \
	    rm -rf $(DEMO_OUT)/subject; \
	    $(BIN) learn --model "$(MODEL)" --images "$(IMAGES)" --masks "$(MASKS)" --class-noun "$(CLASS)" --out $(DEMO_OUT)/subject; \
	    $(BIN) generate --model "$(MODEL)" --subject $(DEMO_OUT)/subject --prompt "a photo of a $(CLASS) on the beach" \
	      --reference-guidance --save-intermediates --seed 0 --out $(DEMO_OUT)/subject.png; \
	    if [ -n "$(PHOTO)" ]; then \
	      $(BIN) replace --model "$(MODEL)" --subject $(DEMO_OUT)/subject --image "$(PHOTO)" --caption "$(CAPTION)" \
	        --source-word "$(WORD)" --save-intermediates --out $(DEMO_OUT)/replaced.png; \
	    fi; \
	  fi; \
	  echo "demo images: $(DEMO_OUT)/demo.png$(if $(IMAGES), $(DEMO_OUT)/subject.png (stages in $(DEMO_OUT)/subject-intermediates/))$(if $(PHOTO), and $(DEMO_OUT)/replaced.png (stages in $(DEMO_OUT)/replaced-intermediates/))"; \
	fi

# The world benchmark (docs/experiments.md): settings chosen on the 5 validation subjects, then
# the 10 test subjects x (Table 2's methods, DreamBooth, copy, base) x 4 prompts x 4 images on the
# world model, scored with the world's DINO / CLIP and the ground truth; report and validity.
# On 2 CPU cores this is many hours (a reference-guided image takes ~40 s there: the hifi and
# db+guidance rows alone are 20 units x 16 guided images); on a GPU, PROCS=12 DEVICE=cuda.
WORLD_RUN := runs/world
world-benchmark: build
	BIN=$(BIN) RUN=$(WORLD_RUN) PROCS=2 DEVICE=cpu bash scripts/world_benchmark.sh

# Regenerate the parity fixtures (by hand; needs the pinned diffusers/transformers).
fixtures: $(TORCH_STAMP)
	$(PY) -m pip install --quiet -r scripts/requirements-fixtures.txt
	HF_HUB_OFFLINE=1 $(PY) scripts/make_fixtures.py

# The pure-Python diffusers and transformers wheels that scripts/device_bench.sh installs on a
# lent GPU machine (its image has PyTorch and every dependency, but fetches nothing).
device-wheels: $(TORCH_STAMP)
	$(PY) -m pip download --quiet --no-deps -d .wheels diffusers==0.42.1 transformers==5.24.0

clean-venv:
	rm -rf $(VENV)

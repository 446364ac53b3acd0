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

.PHONY: build test demo fixtures clean-venv

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

# The main job on a real model (MODEL=path/to/diffusers/sd-1.x) or, without MODEL, on a tiny
# model with RANDOM weights made by init-random (its image is noise: it shows the tool runs).
DEMO_OUT := demo-out
demo: build
	@mkdir -p $(DEMO_OUT)
	@if [ -n "$(MODEL)" ]; then \
	  $(BIN) generate --model "$(MODEL)" --prompt "a photo of a dog on the beach" --seed 0 --out $(DEMO_OUT)/demo.png; \
	else \
	  echo "No MODEL=path given: using a tiny model with RANDOM weights (the image will be noise)."; \
	  rm -rf $(DEMO_OUT)/tiny-random; \
	  $(BIN) init-random --config tiny --tokenizer tests/fixtures/tokenizers/clip --out $(DEMO_OUT)/tiny-random --seed 0 >/dev/null; \
	  $(BIN) generate --model $(DEMO_OUT)/tiny-random --prompt "a photo of a dog on the beach" --seed 0 --steps 20 --out $(DEMO_OUT)/demo.png; \
	fi
	@echo "demo image: $(DEMO_OUT)/demo.png"

# Regenerate the parity fixtures (by hand; needs the pinned diffusers/transformers).
fixtures: $(TORCH_STAMP)
	$(PY) -m pip install --quiet -r scripts/requirements-fixtures.txt
	HF_HUB_OFFLINE=1 $(PY) scripts/make_fixtures.py

clean-venv:
	rm -rf $(VENV)

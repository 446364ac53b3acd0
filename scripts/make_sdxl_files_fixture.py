#!/usr/bin/env python3
"""Our SDXL files as diffusers loads them (issue 23's checks): the LoRA `learn --mode lora
--train-text-encoder` writes on tiny-xl (the UNet and both text encoders) — the diffusers file
and the kohya file with sd-scripts' SDXL names (LDM UNet paths, lora_te1_ / lora_te2_) — and the textual-inversion pair `learn --mode ti` writes (`learned_embeds.safetensors` for
encoder 1, `learned_embeds_2.safetensors` for encoder 2, as `textual_inversion_sdxl.py`), with
the images `StableDiffusionXLPipeline` draws after loading each.

Run by hand from the repository root, after scripts/make_sdxl_fixture.py (CPU only, seconds):

    /work/main/.venv/bin/python scripts/make_sdxl_files_fixture.py --from-ours target/release/hifi-tuner

Writes tests/fixtures/xl-files/ (pytorch_lora_weights.safetensors, kohya.safetensors,
learned_embeds.safetensors, learned_embeds_2.safetensors, copied from our runs) and
tests/fixtures/xl-files.ref.safetensors: `{base,peft,kohya,ti}.image_u8` (PROMPTS, seed 0,
3 DDIM steps, guidance 7.5, 16 × 24), diffusers' images rounded to 8 bits as its PIL output
does. The LoRA is loaded with `pipe.load_lora_weights(dir, weight_name=…)` (the kohya file goes
through diffusers' own SGM-name conversion), the embeddings with `pipe.load_textual_inversion`
once per encoder, as the diffusers docs show for SDXL.

Pinned versions: scripts/requirements-fixtures.txt.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from diffusers import DDIMScheduler, StableDiffusionXLPipeline  # noqa: E402

from make_fixtures import check_versions, save_safetensors_sorted  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests/fixtures/tiny-xl"
OUT = ROOT / "tests/fixtures/xl-files"
REF = ROOT / "tests/fixtures/xl-files.ref.safetensors"
PHOTOS = ROOT / "tests/fixtures/photos/dog"
TOKEN = "<dx>"
PROMPTS = {"lora": "a sks dog on the beach", "ti": f"a photo of {TOKEN} on a rock"}
GEN = dict(seed=0, steps=3, guidance=7.5, height=16, width=24)
# A high learning rate, so that the files change the image far beyond rounding.
LORA_ARGS = ["--mode", "lora", "--lr", "0.05", "--steps", "3", "--no-prior", "--seed", "3", "--train-text-encoder"]
TI_ARGS = ["--mode", "ti", "--token", TOKEN, "--lr", "0.5", "--steps", "3", "--seed", "3"]


def learn(bin_: str, out: Path, extra: list[str]) -> None:
    cmd = [bin_, "learn", "--model", str(MODEL), "--images", str(PHOTOS), "--class-noun", "dog", "--device", "cpu",
           *extra, "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def draw(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        images = pipe(prompt=prompt, num_inference_steps=GEN["steps"], guidance_scale=GEN["guidance"],
                      height=GEN["height"], width=GEN["width"],
                      generator=torch.Generator("cpu").manual_seed(GEN["seed"]), output_type="np").images
    return torch.from_numpy((images * 255).round().astype("uint8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from-ours", required=True, help="the hifi-tuner binary whose files are checked")
    a = ap.parse_args()
    check_versions()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        lora, ti = Path(tmp) / "xl-lora", Path(tmp) / "xl-ti"
        learn(a.from_ours, lora, LORA_ARGS)
        learn(a.from_ours, ti, TI_ARGS)
        shutil.copy(lora / "pytorch_lora_weights.safetensors", OUT / "pytorch_lora_weights.safetensors")
        shutil.copy(lora / "a1111/xl-lora.safetensors", OUT / "kohya.safetensors")
        for f in ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]:
            shutil.copy(ti / f, OUT / f)
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, dtype=torch.float32)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    T = {"base.image_u8": draw(pipe, PROMPTS["lora"])}
    for key, name in [("peft", "pytorch_lora_weights.safetensors"), ("kohya", "kohya.safetensors")]:
        pipe.load_lora_weights(str(OUT), weight_name=name)
        T[f"{key}.image_u8"] = draw(pipe, PROMPTS["lora"])
        pipe.unload_lora_weights()
        d = (T[f"{key}.image_u8"].float() - T["base.image_u8"].float()).abs().mean()
        print(f"  {key}: mean |image − base| {d:.2f} levels")
        assert d > 1.0, f"{key}: the LoRA must change the image well beyond rounding"
    pipe.load_textual_inversion(str(OUT / "learned_embeds.safetensors"), token=TOKEN, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(str(OUT / "learned_embeds_2.safetensors"), token=TOKEN,
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    T["ti.image_u8"] = draw(pipe, PROMPTS["ti"])
    M = {"generator": "scripts/make_sdxl_files_fixture.py", "torch": torch.__version__, "token": TOKEN,
         **{f"prompt.{k}": v for k, v in PROMPTS.items()}, **{k: str(v) for k, v in GEN.items()}}
    save_safetensors_sorted({k: v.contiguous() for k, v in T.items()}, REF, M)
    print(f"wrote {OUT} and {REF}")


if __name__ == "__main__":
    main()

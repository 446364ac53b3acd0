#!/usr/bin/env python3
"""Build the LoRA fixtures: a DreamBooth-LoRA training step of diffusers + peft, and the images
diffusers' `load_lora_weights` draws from our LoRA files and from a kohya file of peft's own
conversion.

Run by hand from the repository root, after scripts/make_fixtures.py (CPU only, seconds):

    /work/main/.venv/bin/python scripts/make_lora_fixture.py                     # the step
    /work/main/.venv/bin/python scripts/make_lora_fixture.py --from-ours target/debug/hifi-tuner

**The step** (tests/fixtures/lora.ref.safetensors, tests/fixtures/lora/init.safetensors): peft
adapters as diffusers' examples/dreambooth/train_dreambooth_lora.py adds them —
`LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian")` on the UNet's to_q, to_k, to_v,
to_out.0 and (`--train_text_encoder`) the text encoder's q_proj, k_proj, v_proj, out_proj — with
B set to N(0, 0.1²) (peft's B = 0 would leave A without a gradient at the first step), saved with
`StableDiffusionLoraLoaderMixin.save_lora_weights` as lora/init.safetensors. Two steps of the
script's loop on a fixed [instance; class] batch (prior preservation, weight 1): text encoder
with gradients, noise-prediction MSE, `clip_grad_norm_(params, 1.0)`, `torch.optim.AdamW(lr=1e-3,
betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)` (lr 1e-3 rather than 1e-4 so that the change is
resolved in float32). Recorded: the batch, loss{0,1}, grad_norm{0,1} and every adapter after the
two steps as `final.<diffusers key>`.

**The files** (`--from-ours BIN`): runs `BIN learn --mode lora` on tiny-a (LEARN_ARGS: a high
learning rate, so that the adapters change the image far beyond rounding), copies its two files
to tests/fixtures/lora/ours/ (pytorch_lora_weights.safetensors, kohya.safetensors), writes
tests/fixtures/lora/peft_kohya.safetensors = diffusers' `convert_state_dict_to_kohya` of the
init adapters (peft's conversion, not our writer), and the images diffusers draws with
`pipe.load_lora_weights(file)` + `cross_attention_kwargs={"scale": s}` (PROMPT, seed 0, 3 DDIM
steps, guidance 7.5) as tests/fixtures/lora/diffusers-NAME.png, plus base.png without a LoRA, and
the same images before 8-bit rounding in tests/fixtures/lora/diffusers-images.safetensors.

Pinned versions: scripts/requirements-fixtures.txt (peft 0.21.2).
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from make_fixtures import check_versions, save_safetensors_sorted  # noqa: E402

# transformers 5.24's PEFT integration (`add_adapter`, `load_adapter`, which diffusers'
# `load_lora_weights` calls for the text encoder) asks for peft >= 0.22, and the newest peft
# published is 0.21.2: its version check is bypassed here (the calls it guards are peft's
# `inject_adapter_in_model` / `set_peft_model_state_dict`, present in 0.21). The numbers are
# checked, not assumed: the text-encoder adapters load and change the image (see --from-ours).
import transformers.integrations.peft as _tpeft  # noqa: E402

_tpeft.check_peft_version = lambda min_version=None: None

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
MODEL = FIX / "tiny-a"
OUT = FIX / "lora"
REF = FIX / "lora.ref.safetensors"
PEFT_VERSION = "0.21.2"

LR = 1e-3
RANK, ALPHA = 4, 8
PROMPTS = ["a sks dog", "a photo of a dog"]
TIMESTEPS = [250, 700]
SEED = 4321
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def adapters(unet, te):
    from peft.utils import get_peft_model_state_dict

    out = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    out.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(te).items()})
    return out


def make_step_fixture() -> None:
    import peft
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    check_versions()
    assert peft.__version__ == PEFT_VERSION, f"peft {peft.__version__}, wanted {PEFT_VERSION}"
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tok = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet", torch_dtype=torch.float32)
    sched = DDPMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    unet.requires_grad_(False)
    te.requires_grad_(False)
    torch.manual_seed(SEED)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    te.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TE_TARGETS))
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in sorted(list(unet.named_parameters()) + [(f"te.{n}", p) for n, p in te.named_parameters()]):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=get_peft_model_state_dict(unet),
            text_encoder_lora_layers=get_peft_model_state_dict(te),
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=te.peft_config["default"].to_dict(),
        )
        shutil.copy(Path(tmp) / "pytorch_lora_weights.safetensors", OUT / "init.safetensors")
    init = {k: v.detach().clone() for k, v in adapters(unet, te).items()}

    s = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, s, s, generator=g)
    noise = torch.randn(2, unet.config.in_channels, s, s, generator=g)
    t = torch.tensor(TIMESTEPS, dtype=torch.long)
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    out = {"latents": latents, "noise": noise, "timesteps": t, "ids": ids}
    unet.train()
    te.train()
    params = [p for p in unet.parameters() if p.requires_grad] + [p for p in te.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    for step in range(2):
        ehs = te(ids)[0]
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, ehs, return_dict=False)[0]
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(noise, 2, dim=0)
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        loss = loss + F.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
        out[f"loss{step}"] = loss.detach().clone()
        loss.backward()
        out[f"grad_norm{step}"] = torch.nn.utils.clip_grad_norm_(params, 1.0).detach().clone()
        opt.step()
        opt.zero_grad()
    final = adapters(unet, te)
    assert final.keys() == init.keys()
    for k, v in final.items():
        out[f"final.{k}"] = v.detach().contiguous()
    moved = max((final[k] - init[k]).abs().max().item() for k in final)
    print(f"loss {out['loss0'].item():.6f} -> {out['loss1'].item():.6f}, grad norm "
          f"{out['grad_norm0'].item():.4f}, {len(final)} adapter tensors, max |Δ| {moved:.2e}")
    meta = {"lr": str(LR), "rank": str(RANK), "alpha": str(ALPHA), "prompts": "|".join(PROMPTS)}
    save_safetensors_sorted({k: v.contiguous() for k, v in out.items()}, REF, meta)
    print(f"wrote {REF.relative_to(ROOT)} and {(OUT / 'init.safetensors').relative_to(ROOT)}")


LEARN_ARGS = ["--class-noun", "dog", "--steps", "3", "--no-prior", "--lr", "0.1", "--rank", "4", "--alpha", "8",
              "--train-text-encoder", "--seed", "3", "--device", "cpu"]
PROMPT = "a sks dog on the beach"
# name, LoRA file (relative to OUT), scale
IMAGES = [
    ("peft-1.0", "ours/pytorch_lora_weights.safetensors", 1.0),
    ("peft-0.5", "ours/pytorch_lora_weights.safetensors", 0.5),
    ("kohya-1.0", "ours/kohya.safetensors", 1.0),
    ("kohya-0.5", "ours/kohya.safetensors", 0.5),
    ("peft_kohya-1.0", "peft_kohya.safetensors", 1.0),
]


def from_ours(binary: str) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    check_versions()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dog"
        subprocess.run([binary, "learn", "--mode", "lora", "--model", str(MODEL), "--images",
                        str(FIX / "photos" / "dog"), "--out", str(out), *LEARN_ARGS], check=True)
        (OUT / "ours").mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "pytorch_lora_weights.safetensors", OUT / "ours" / "pytorch_lora_weights.safetensors")
        shutil.copy(out / "a1111" / "dog.safetensors", OUT / "ours" / "kohya.safetensors")
    # peft's own conversion of the init adapters to kohya keys (alpha = rank, as it writes)
    init = load_file(OUT / "init.safetensors")
    save_file(convert_state_dict_to_kohya(init), OUT / "peft_kohya.safetensors", metadata={"format": "pt"})

    def draw(lora=None, scale=None, output_type="pil"):
        # a fresh pipeline per image: after `unload_lora_weights`, the next LoRA's image was
        # drawn with the previous call's scale (diffusers 0.42, seen here)
        pipe = StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        assert isinstance(pipe.scheduler, DDIMScheduler), type(pipe.scheduler)
        kw = {}
        if lora is not None:
            pipe.load_lora_weights(str(lora))
            kw = {"cross_attention_kwargs": {"scale": scale}}
        return pipe(PROMPT, num_inference_steps=3, guidance_scale=7.5, output_type=output_type,
                    generator=torch.Generator("cpu").manual_seed(0), **kw).images[0]

    base = draw()
    base.save(OUT / "base.png")
    floats = {"base": torch.from_numpy(draw(output_type="np").copy())}
    for name, rel, scale in IMAGES:
        img = draw(OUT / rel, scale)
        img.save(OUT / f"diffusers-{name}.png")
        floats[name] = torch.from_numpy(draw(OUT / rel, scale, output_type="np").copy())
        diff = np.abs(np.asarray(img, dtype=np.int32) - np.asarray(base, dtype=np.int32)).max()
        print(f"diffusers-{name}.png: max |LoRA − base| = {diff}/255")
    # the images before 8-bit rounding, (H, W, 3) in [0, 1]
    save_safetensors_sorted({k: v.float().contiguous() for k, v in floats.items()},
                            OUT / "diffusers-images.safetensors",
                            {"prompt": PROMPT, "steps": "3", "guidance": "7.5", "seed": "0"})
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--from-ours")
    a = ap.parse_args()
    if a.from_ours:
        from_ours(a.from_ours)
    else:
        make_step_fixture()

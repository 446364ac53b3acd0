#!/usr/bin/env python3
"""Build the DreamBooth parity fixture: two training steps of diffusers' train_dreambooth.py.

Run by hand from the repository root, after scripts/make_fixtures.py (CPU only, a few seconds):

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_dreambooth_fixture.py

It (re)writes tests/fixtures/dreambooth.ref.safetensors: a fixed batch (latents, noise,
timesteps, prompt ids) and, for tiny-a's UNet trained as train_dreambooth.py does it
(noise-prediction MSE + prior_loss_weight · prior MSE on the [instance; class] batch,
`clip_grad_norm_(params, 1.0)`, `torch.optim.AdamW(betas=(0.9, 0.999), weight_decay=1e-2,
eps=1e-8)`), with (`prior.*`) and without (`noprior.*`, the instance half of the batch)
prior preservation, two steps on that batch:

    {v}.loss0 / {v}.loss1, {v}.instance0, {v}.prior0    losses before each step
    {v}.grad_norm0 / {v}.grad_norm1                     clip_grad_norm_'s total norm
    {v}.delta.NAME                                      θ_2 − θ_0 of a few whole weights
    {v}.delta_l1 / {v}.delta_sum                        Σ|θ_2 − θ_0|, Σ(θ_2 − θ_0) over all

The learning rate is 1e-3 (not 5e-6) so that θ_2 − θ_0 is resolved in float32. Pinned
versions: scripts/requirements-fixtures.txt.

`--from-ours BIN`: runs `BIN learn --mode dreambooth` on tiny-a with LEARN_ARGS (as
tests/dreambooth_cli.rs does), loads the OUT/model folder it writes with diffusers and saves
the image of GEN_PROMPT as tests/fixtures/dreambooth/diffusers.png (our image from the same
folder must equal it).

`--check-model DIR`: loads a DreamBooth OUT/model folder written by hifi-tuner with
StableDiffusionPipeline.from_pretrained and prints the image of `--prompt` (seed 0, 3 DDIM
steps) as PNG to `--out` (compare it with `hifi-tuner generate --subject`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from make_fixtures import check_versions, save_safetensors_sorted  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
MODEL = FIX / "tiny-a"
REF = FIX / "dreambooth.ref.safetensors"

LR = 1e-3
PRIOR_WEIGHT = 1.0
PROMPTS = ["a sks dog", "a photo of a dog"]
TIMESTEPS = [250, 700]
SEED = 1234
# whole weights recorded (small ones, from different kinds of layer)
WATCH = [
    "conv_in.weight",
    "conv_out.bias",
    "time_embedding.linear_1.bias",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "mid_block.resnets.0.norm1.weight",
]


def train(unet_state, te, sched, latents, noise, t, ids, prior: bool, prefix: str) -> dict:
    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet", torch_dtype=torch.float32)
    unet.load_state_dict(unet_state)
    unet.train()
    params = list(unet.parameters())
    start = {k: v.detach().clone() for k, v in unet.named_parameters()}
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    out = {}
    with torch.no_grad():
        ehs = te(ids)[0]
    for step in range(2):
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, ehs, return_dict=False)[0]
        target = noise
        if prior:
            pred, pred_prior = torch.chunk(pred, 2, dim=0)
            target, target_prior = torch.chunk(target, 2, dim=0)
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
            prior_loss = F.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
            out[f"{prefix}.instance{step}"] = loss.detach().clone()
            out[f"{prefix}.prior{step}"] = prior_loss.detach().clone()
            loss = loss + PRIOR_WEIGHT * prior_loss
        else:
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        out[f"{prefix}.loss{step}"] = loss.detach().clone()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        out[f"{prefix}.grad_norm{step}"] = norm.detach().clone()
        opt.step()
        opt.zero_grad()
    named = dict(unet.named_parameters())
    for name in WATCH:
        out[f"{prefix}.delta.{name}"] = (named[name].detach() - start[name]).contiguous()
    deltas = [(named[k].detach().double() - start[k].double()) for k in start]
    out[f"{prefix}.delta_l1"] = torch.stack([d.abs().sum() for d in deltas]).sum().float()
    out[f"{prefix}.delta_sum"] = torch.stack([d.sum() for d in deltas]).sum().float()
    print(f"  {prefix}: loss {out[f'{prefix}.loss0'].item():.6f} -> {out[f'{prefix}.loss1'].item():.6f}, "
          f"grad norm {out[f'{prefix}.grad_norm0'].item():.4f}, Σ|Δ| {out[f'{prefix}.delta_l1'].item():.6f}")
    return out


def make_fixture() -> None:
    check_versions()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tok = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder", torch_dtype=torch.float32).eval()
    sched = DDPMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    assert sched.config.prediction_type == "epsilon"
    unet0 = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet", torch_dtype=torch.float32)
    state = {k: v.clone() for k, v in unet0.state_dict().items()}
    s = unet0.config.sample_size
    g = torch.Generator().manual_seed(SEED)
    latents = torch.randn(2, unet0.config.in_channels, s, s, generator=g)
    noise = torch.randn(2, unet0.config.in_channels, s, s, generator=g)
    t = torch.tensor(TIMESTEPS, dtype=torch.long)
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    out = {"latents": latents, "noise": noise, "timesteps": t, "ids": ids}
    out.update(train(state, te, sched, latents, noise, t, ids, True, "prior"))
    out.update(train(state, te, sched, latents[:1], noise[:1], t[:1], ids[:1], False, "noprior"))
    meta = {"lr": str(LR), "prior_weight": str(PRIOR_WEIGHT), "watch": ",".join(WATCH),
            "prompts": "|".join(PROMPTS)}
    save_safetensors_sorted({k: v.contiguous() for k, v in out.items()}, REF, meta)
    print(f"wrote {REF.relative_to(ROOT)}")


LEARN_ARGS = ["--class-noun", "dog", "--steps", "2", "--no-prior", "--seed", "3", "--device", "cpu"]
GEN_PROMPT = "a sks dog on the beach"


def from_ours(binary: str) -> None:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "db"
        subprocess.run([binary, "learn", "--mode", "dreambooth", "--model", str(MODEL), "--images",
                        str(FIX / "photos" / "dog"), "--out", str(out), *LEARN_ARGS], check=True)
        dst = FIX / "dreambooth" / "diffusers.png"
        dst.parent.mkdir(exist_ok=True)
        check_model(str(out / "model"), GEN_PROMPT, str(dst))


def check_model(folder: str, prompt: str, out: str) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler), type(pipe.scheduler)
    img = pipe(prompt, num_inference_steps=3, guidance_scale=7.5,
               generator=torch.Generator("cpu").manual_seed(0)).images[0]
    img.save(out)
    print(f"diffusers loaded {folder} and wrote {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-model")
    ap.add_argument("--from-ours")
    ap.add_argument("--prompt", default="a sks dog on the beach")
    ap.add_argument("--out", default="/tmp/diffusers-db.png")
    a = ap.parse_args()
    if a.from_ours:
        from_ours(a.from_ours)
    elif a.check_model:
        check_model(a.check_model, a.prompt, a.out)
    else:
        make_fixture()

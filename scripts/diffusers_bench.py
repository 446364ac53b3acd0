#!/usr/bin/env python3
"""diffusers' side of scripts/device_bench.sh: the same work as `hifi-tuner bench`, on the same
random SD-1.5-shaped folder, on CUDA. Prints one JSON object per measurement.

    python3 scripts/diffusers_bench.py --model /tmp/sd15-random --steps 50 --size 512

- `pipeline`: StableDiffusionPipeline with DDIM, w = 7.5, at fp16 and bf16 (seconds per image,
  after a 2-step warm-up).
- `unet_fwd_bwd`: one textual-inversion training step's network work, as diffusers'
  textual_inversion.py does it: text encoder + UNet forward, MSE to the noise, backward to the
  token-embedding matrix (fp32 weights under torch.autocast, as `--mixed_precision` does),
  steps/s; plus its FLOPs (counted by torch.utils.flop_counter) for MFU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline


def sync() -> None:
    torch.cuda.synchronize()


def pipeline(model: str, dtype: torch.dtype, steps: int, size: int) -> dict:
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to("cuda")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of a dog on the beach", guidance_scale=7.5, height=size, width=size)
    pipe(num_inference_steps=2, **kw)
    sync()
    t = time.perf_counter()
    pipe(num_inference_steps=steps, **kw)
    sync()
    s = time.perf_counter() - t
    del pipe
    torch.cuda.empty_cache()
    return {"what": "diffusers_pipeline", "dtype": str(dtype).removeprefix("torch."), "seconds": s,
            "seconds_per_step": s / steps}


def unet_fwd_bwd(model: str, dtype: torch.dtype, size: int, n: int) -> dict:
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False).to("cuda")
    te, unet, tok = pipe.text_encoder, pipe.unet, pipe.tokenizer
    # As textual_inversion.py: everything frozen but the token-embedding matrix (fp32 weights,
    # autocast to the half kind, as --mixed_precision does).
    te.requires_grad_(False)
    unet.requires_grad_(False)
    emb = te.get_input_embeddings().weight
    emb.requires_grad_(True)
    ids = tok("a photo of a sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids.cuda()
    lat = size // 8
    x = torch.randn(1, 4, lat, lat, device="cuda")
    noise = torch.randn_like(x)
    t = torch.tensor([500], device="cuda")

    def run() -> None:
        with torch.autocast("cuda", dtype=dtype):
            hidden = te(ids)[0]
            eps = unet(x, t, hidden).sample
        loss = torch.nn.functional.mse_loss(eps.float(), noise)
        loss.backward()
        emb.grad = None

    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        run()
    flops = fc.get_total_flops()
    for _ in range(3):
        run()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    sync()
    s = (time.perf_counter() - t0) / n
    del pipe
    torch.cuda.empty_cache()
    return {"what": "diffusers_unet_fwd_bwd", "dtype": str(dtype).removeprefix("torch."), "steps_per_second": 1 / s,
            "flops_per_step": flops}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--fwd-bwd-steps", type=int, default=20)
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    for dtype in (torch.float16, torch.bfloat16):
        print(json.dumps(pipeline(a.model, dtype, a.steps, a.size)), flush=True)
        print(json.dumps(unet_fwd_bwd(a.model, dtype, a.size, a.fwd_bwd_steps)), flush=True)


if __name__ == "__main__":
    main()

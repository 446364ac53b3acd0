#!/usr/bin/env python3
"""Build the bf16 generation fixture: diffusers' StableDiffusionPipeline on tiny-a in bfloat16
and in float32, from the same x_T (drawn in float32 and cast, since diffusers' bf16 pipeline
would otherwise draw its noise in bf16: another image).

Run by hand from the repository root, after scripts/make_fixtures.py (CPU only, seconds):

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_bf16_fixture.py

It (re)writes tests/fixtures/bf16.ref.safetensors deterministically:

    bf16.x_T          (1, 4, 16, 16) f32   torch.randn with Generator("cpu").manual_seed(SEED)
    bf16.image_fp32   (1, 32, 32, 3) f32   pipeline(output_type="np"), float32 weights
    bf16.image_bf16   (1, 32, 32, 3) f32   the same with torch_dtype=torch.bfloat16, latents cast

The Rust test holds our bf16 image within 1.5x diffusers' own bf16-vs-fp32 distance of
diffusers' bf16 image. Pinned versions: scripts/requirements-fixtures.txt (asserted).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import diffusers  # noqa: E402
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402

from make_fixtures import check_versions, save_safetensors_sorted  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "tiny-a"
REF = ROOT / "tests" / "fixtures" / "bf16.ref.safetensors"
GEN = dict(prompt="a photo of a dog on the beach", seed=123, steps=10, guidance=7.5, height=32, width=32)


def run(dtype: torch.dtype, x_t: torch.Tensor) -> torch.Tensor:
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler), type(pipe.scheduler)
    out = pipe(GEN["prompt"], num_inference_steps=GEN["steps"], guidance_scale=GEN["guidance"],
               height=GEN["height"], width=GEN["width"], latents=x_t.to(dtype), output_type="np")
    return torch.from_numpy(np.asarray(out.images, dtype=np.float32)).contiguous()  # (1, H, W, 3) in [0, 1]


def main() -> None:
    check_versions()
    torch.set_num_threads(1)
    g = torch.Generator("cpu").manual_seed(GEN["seed"])
    x_t = torch.randn((1, 4, GEN["height"] // 2, GEN["width"] // 2), generator=g, dtype=torch.float32)
    fp32 = run(torch.float32, x_t)
    bf16 = run(torch.bfloat16, x_t)
    d = (bf16 - fp32).abs()
    print(f"diffusers bf16 vs fp32 on tiny-a: mean |diff| {d.mean():.4e}  max {d.max():.4e}")
    assert d.max() > 0, "bf16 and fp32 images are identical: the fixture would pin nothing"
    tensors = {"bf16.x_T": x_t, "bf16.image_fp32": fp32, "bf16.image_bf16": bf16}
    meta = {k: str(v) for k, v in GEN.items()}
    meta.update(model="tiny-a", generator="scripts/make_bf16_fixture.py", torch=torch.__version__,
                diffusers=diffusers.__version__)
    save_safetensors_sorted(tensors, REF, meta)
    print(f"wrote {REF.relative_to(ROOT)} ({REF.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

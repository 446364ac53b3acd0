#!/usr/bin/env python3
"""Reference embeddings of the shipped world encoders, computed by transformers.

Run by hand from the repository root (CPU only, a few seconds) after (re)training
assets/world-dino or assets/world-clip:

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_world_encoders_fixture.py

It loads the shipped folders exactly as a transformers user would —
`ViTModel.from_pretrained("assets/world-dino")` with its `BitImageProcessor` (PIL backend),
`CLIPModel.from_pretrained("assets/world-clip")` with its `CLIPImageProcessor` (PIL backend) and
`CLIPTokenizer` — and records, for the two world images in tests/fixtures/world-encoders/
(`gt.png`: the validation subject `quartered_ball` centred on the beach, its ground truth;
`photo.png`: its first photo, on the grass; both written by `hifi-tuner world --seed 0`, see
tests/fixtures/README.md) and two prompts, what our `score` computes:

    dino.pixel_values   (2, 3, 64, 64) the processor's output
    dino.cls            (2, d)  last_hidden_state[:, 0] (after the final layernorm)
    clip.pixel_values   (2, 3, 64, 64)
    clip.image_embeds   (2, P)  get_image_features(...).pooler_output
    clip.input_ids      (2, 77) padded to max_length 77
    clip.text_embeds    (2, P)  get_text_features(...).pooler_output
    gt.rgb_u8, photo.rgb_u8      the images as decoded by PIL

into tests/fixtures/world-encoders/expected.safetensors. The models are loaded with the
default dtype ("auto"): config.json says float32, so the fp16-stored CLIP is upcast on load;
the script asserts that both run in float32. Pinned versions: scripts/requirements-fixtures.txt.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import CLIPModel, CLIPTokenizer, ViTModel  # noqa: E402
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from make_fixtures import check_versions, save_safetensors_sorted, stats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "world-encoders"
DINO = ROOT / "assets" / "world-dino"
CLIP = ROOT / "assets" / "world-clip"
REF = FIX / "expected.safetensors"
IMAGES = ("gt", "photo")
PROMPTS = ["a ball on the beach", "a striped cube in the snow"]
PILLOW = "13.0.0"


def main() -> None:
    check_versions()
    if PIL.__version__ != PILLOW:
        sys.exit(f"make_world_encoders_fixture.py: Pillow {PIL.__version__}, wanted {PILLOW}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    images = []
    T: dict[str, torch.Tensor] = {}
    for name in IMAGES:
        with Image.open(FIX / f"{name}.png") as im:
            im.load()
            rgb = im.convert("RGB")
        assert rgb.size == (64, 64), rgb.size
        T[f"{name}.rgb_u8"] = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())
        images.append(rgb)

    dino = ViTModel.from_pretrained(DINO).eval()
    assert dino.dtype == torch.float32, dino.dtype
    dproc = BitImageProcessorPil.from_pretrained(DINO)
    pv = dproc(images=images, return_tensors="pt").pixel_values
    T["dino.pixel_values"] = pv.contiguous()
    with torch.no_grad():
        T["dino.cls"] = dino(pixel_values=pv).last_hidden_state[:, 0].contiguous()

    clip = CLIPModel.from_pretrained(CLIP).eval()
    assert clip.dtype == torch.float32, clip.dtype
    cproc = CLIPImageProcessorPil.from_pretrained(CLIP)
    tok = CLIPTokenizer.from_pretrained(CLIP)
    pv = cproc(images=images, return_tensors="pt").pixel_values
    T["clip.pixel_values"] = pv.contiguous()
    enc = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    T["clip.input_ids"] = enc.input_ids.contiguous()
    with torch.no_grad():
        T["clip.image_embeds"] = clip.get_image_features(pixel_values=pv).pooler_output.contiguous()
        T["clip.text_embeds"] = clip.get_text_features(input_ids=T["clip.input_ids"]).pooler_output.contiguous()

    M = {
        "generator": "scripts/make_world_encoders_fixture.py",
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "images": json.dumps(list(IMAGES)),
        "prompts": json.dumps(PROMPTS),
        "image_processors": "BitImageProcessorPil (dino), CLIPImageProcessorPil (clip)",
    }
    save_safetensors_sorted(T, REF, M)
    print(f"wrote {REF.relative_to(ROOT)}: {len(T)} tensors")
    for k in sorted(T):
        print(f"    {k:20s} {str(T[k].dtype):14s} {tuple(T[k].shape)}  {stats(T[k]) if T[k].is_floating_point() else ''}")
    cos = torch.nn.functional.cosine_similarity
    print("  dino cos(gt, photo)", float(cos(T["dino.cls"][0], T["dino.cls"][1], dim=0)))
    print("  clip-t cos(image, prompt):", cos(T["clip.image_embeds"][:, None], T["clip.text_embeds"][None], dim=-1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Build the tiny random CLIP fixture (transformers `CLIPModel`) and its reference tensors.

Run by hand from the repository root (CPU only, a few seconds):

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_clip_fixture.py

It (re)writes, deterministically (a rerun gives byte-identical files):

    tests/fixtures/clip-tiny/config.json              CLIPConfig (text_config / vision_config)
    tests/fixtures/clip-tiny/model.safetensors        CLIPModel.save_pretrained, fp16 weights
    tests/fixtures/clip-tiny/preprocessor_config.json CLIPImageProcessor (shortest_edge 36, crop 32)
    tests/fixtures/clip-tiny/{vocab.json,merges.txt,tokenizer_config.json,special_tokens_map.json}
                                                      copies of tests/fixtures/tokenizers/clip
    tests/fixtures/clip.ref.safetensors               inputs / outputs (see tests/fixtures/README.md)

The layout is that of openai/clip-vit-base-patch32. Pinned versions: scripts/requirements-fixtures.txt
(asserted) plus Pillow 13.0.0. torchvision is not installed, so transformers 5's default
(torchvision) `CLIPImageProcessor` is unavailable; the reference uses its PIL backend
`CLIPImageProcessorPil`, the same algorithm (PIL bicubic resize, floor-division centre crop).
"""

from __future__ import annotations

import json
import os
import shutil
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
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from make_fixtures import check_versions, save_safetensors_sorted, stats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "clip-tiny"
REF = FIX / "clip.ref.safetensors"
TOK = FIX / "tokenizers" / "clip"
PHOTO = FIX / "photos" / "dog" / "00.jpg"
PILLOW = "13.0.0"
SEED = 2025

TEXT = dict(vocab_size=49408, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
            projection_dim=12)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, num_channels=3, hidden_act="quick_gelu",
              layer_norm_eps=1e-5, projection_dim=12)
PROMPTS = ["a photo of a dog", "a red dog in the snow, with a very long caption " + "and more words " * 20]


def reinit(model: CLIPModel, g: torch.Generator) -> None:
    """A spread of weights that keeps every sublayer visible in the outputs."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name == "logit_scale":
                continue
            if "embedding" in name:
                v = torch.randn(p.shape, generator=g) * 0.5
            elif ("layer_norm" in name or "layrnorm" in name or "layernorm" in name) and name.endswith("weight"):
                v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=g) / fan_in ** 0.5
            p.copy_(v)


def main() -> None:
    check_versions()
    if PIL.__version__ != PILLOW:
        sys.exit(f"make_clip_fixture.py: Pillow {PIL.__version__}, wanted {PILLOW}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(SEED)

    config = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=12)
    model = CLIPModel(config).eval()
    reinit(model, g)
    if OUT.exists():
        shutil.rmtree(OUT)
    model.half().save_pretrained(OUT, safe_serialization=True)
    for f in sorted(TOK.iterdir()):
        shutil.copyfile(f, OUT / f.name)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(OUT)
    keys = sorted(load_file(OUT / "model.safetensors"))
    print(f"wrote {OUT.relative_to(ROOT)}: {len(keys)} tensors")

    model = CLIPModel.from_pretrained(OUT, dtype=torch.float32).eval()
    assert model.config.text_config._attn_implementation == "sdpa"
    tok = CLIPTokenizer.from_pretrained(OUT)
    T: dict[str, torch.Tensor] = {}
    enc = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    T["input_ids"] = enc.input_ids.contiguous()
    with torch.no_grad():
        T["text_embeds"] = model.get_text_features(input_ids=T["input_ids"]).pooler_output.contiguous()
        T["pixel_values"] = torch.randn(2, 3, 32, 32, generator=g)
        T["image_embeds"] = model.get_image_features(pixel_values=T["pixel_values"]).pooler_output.contiguous()

    with Image.open(PHOTO) as im:
        im.load()
        rgb = im.convert("RGB")
    T["photo.rgb_u8"] = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())
    # a non-square crop (48 rows x 64 columns): long side int(36*64/48) = 48, left offset 8
    wide = Image.fromarray(np.asarray(rgb, dtype=np.uint8)[8:56].copy(), mode="RGB")
    T["wide.rgb_u8"] = torch.from_numpy(np.asarray(wide, dtype=np.uint8).copy())
    for key, img in (("photo", rgb), ("wide", wide)):
        pv = proc(images=img, return_tensors="pt").pixel_values
        T[f"{key}.pixel_values"] = pv.contiguous()
        with torch.no_grad():
            T[f"{key}.image_embeds"] = model.get_image_features(pixel_values=pv).pooler_output.contiguous()
    # resized-only image (PIL's 36x36 bicubic result): our crop + normalisation must match exactly
    T["photo.resized_u8"] = torch.from_numpy(np.asarray(rgb.resize((36, 36), Image.BICUBIC), dtype=np.uint8).copy())

    M = {
        "generator": "scripts/make_clip_fixture.py",
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "model": "clip-tiny",
        "prompts": json.dumps(PROMPTS),
        "image_processor": "CLIPImageProcessorPil",
        "attn_implementation": "sdpa",
    }
    save_safetensors_sorted(T, REF, M)
    print(f"wrote {REF.relative_to(ROOT)}: {len(T)} tensors")
    for k in sorted(T):
        print(f"    {k:22s} {str(T[k].dtype):14s} {tuple(T[k].shape)}")
    print(f"  text_embeds {stats(T['text_embeds'])}")
    print(f"  image_embeds {stats(T['image_embeds'])}")


if __name__ == "__main__":
    main()

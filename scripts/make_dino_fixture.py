#!/usr/bin/env python3
"""Build the tiny random DINO-style ViT fixture and its reference tensors.

Run by hand from the repository root (CPU only, about 7 s):

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_dino_fixture.py

It (re)writes, deterministically (a rerun gives byte-identical files):

    tests/fixtures/dino-tiny/config.json        transformers ViTConfig (hidden 32, 2 layers, ...)
    tests/fixtures/dino-tiny/model.safetensors  ViTModel.save_pretrained (with the pooler)
    tests/fixtures/dino.ref.safetensors         inputs/outputs of that model, and the
                                                torchvision-style preprocessing of a photo

See the "DINO ViT" section of tests/fixtures/README.md for the keys. Pinned versions:
scripts/requirements-fixtures.txt (asserted, as in make_fixtures.py), plus Pillow 13.0.0 for
the preprocessing reference. torchvision is not installed in the venv; its `Resize(int)` +
`CenterCrop` on a PIL image are re-implemented below, line by line.
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
from transformers import ViTConfig, ViTModel  # noqa: E402

from make_fixtures import check_versions, save_safetensors_sorted, stats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "dino-tiny"
REF = FIX / "dino.ref.safetensors"
PHOTO = FIX / "photos" / "dog" / "00.jpg"
PILLOW = "13.0.0"

CONFIG = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    hidden_act="gelu", layer_norm_eps=1e-6, image_size=32, patch_size=8, num_channels=3,
    qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
SEED = 2024
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def reinit(model: ViTModel, g: torch.Generator) -> None:
    """Replace transformers' init (std 0.02, zero biases, unit norms) by a spread that keeps
    every sublayer's contribution visible in the output."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("cls_token") or name.endswith("position_embeddings"):
                v = torch.randn(p.shape, generator=g) * 0.5
            elif "layernorm" in name and name.endswith("weight"):
                v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            else:  # linear / conv weights: N(0, 1/fan_in)
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=g) / fan_in ** 0.5
            p.copy_(v)


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """torchvision `Resize(size)` (int) on a PIL image: shorter side -> size, longer side ->
    int(size * long / short) (truncated), PIL bicubic."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision `CenterCrop(size)` (image at least `size` both ways): Python's round(), so
    ties go to even (an offset of 2.5 becomes 2)."""
    w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_normalized(img: Image.Image) -> torch.Tensor:
    """`ToTensor` + `Normalize(MEAN, STD)`: (3, H, W) float32."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x - mean) / std


def preprocess(img: Image.Image, image_size: int) -> tuple[torch.Tensor, Image.Image]:
    resize = round(image_size * 256 / 224)
    resized = resize_shorter(img.convert("RGB"), resize)
    return to_normalized(center_crop(resized, image_size)), resized


def main() -> None:
    check_versions()
    if PIL.__version__ != PILLOW:
        sys.exit(f"make_dino_fixture.py: Pillow {PIL.__version__}, wanted {PILLOW}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(SEED)

    config = ViTConfig(**CONFIG)
    model = ViTModel(config).eval()  # add_pooling_layer=True, as facebook/dino-vits16 ships
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    reinit(model, g)
    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT, safe_serialization=True)
    keys = sorted(load_file(OUT / "model.safetensors"))
    print(f"wrote {OUT.relative_to(ROOT)}: {len(keys)} tensors")
    for k in keys:
        print(f"    {k}")

    # reload from disk: the reference is what a user of the saved folder gets
    model = ViTModel.from_pretrained(OUT).eval()
    assert model.config._attn_implementation == "sdpa"
    S = config.image_size
    N = (S // config.patch_size) ** 2

    T: dict[str, torch.Tensor] = {}
    T["pixel_values"] = torch.randn(2, 3, S, S, generator=g)
    with torch.no_grad():
        out = model(pixel_values=T["pixel_values"])
    T["last_hidden_state"] = out.last_hidden_state.contiguous()
    assert T["last_hidden_state"].shape == (2, 1 + N, config.hidden_size)
    T["pooler_output"] = out.pooler_output.contiguous()

    # the photo, decoded by PIL, and its torchvision-style preprocessing
    with Image.open(PHOTO) as im:
        im.load()
        rgb = im.convert("RGB")
    T["photo.rgb_u8"] = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())  # (H, W, 3)
    pv, resized = preprocess(rgb, S)
    T["photo.resized_u8"] = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())
    T["photo.pixel_values"] = pv.unsqueeze(0).contiguous()  # (1, 3, S, S)
    # a non-square crop of the decoded photo (48 rows x 64 columns): exercises the
    # long-side rule int(size * long / short) and a centre-crop offset along one axis only
    wide = Image.fromarray(np.asarray(rgb, dtype=np.uint8)[8:56].copy(), mode="RGB")
    T["wide.rgb_u8"] = torch.from_numpy(np.asarray(wide, dtype=np.uint8).copy())
    wpv, wresized = preprocess(wide, S)
    T["wide.pixel_values"] = wpv.unsqueeze(0).contiguous()
    with torch.no_grad():
        T["photo.last_hidden_state"] = model(pixel_values=T["photo.pixel_values"]).last_hidden_state.contiguous()

    M = {
        "generator": "scripts/make_dino_fixture.py",
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "model": "dino-tiny",
        "photo": str(PHOTO.relative_to(FIX)),
        "photo_size": json.dumps(list(rgb.size)),
        "resize": str(round(S * 256 / 224)),
        "photo_resized_size": json.dumps(list(resized.size)),
        "wide_resized_size": json.dumps(list(wresized.size)),
        "crop": str(S),
        "mean": json.dumps(MEAN),
        "std": json.dumps(STD),
        "attn_implementation": "sdpa",
    }
    save_safetensors_sorted(T, REF, M)
    print(f"wrote {REF.relative_to(ROOT)}: {len(T)} tensors")
    for k in sorted(T):
        print(f"    {k:26s} {str(T[k].dtype):14s} {tuple(T[k].shape)}")
    print(f"  last_hidden_state {stats(T['last_hidden_state'])}")
    cls = T["last_hidden_state"][:, 0]
    cos = torch.nn.functional.cosine_similarity(cls[0], cls[1], dim=0).item()
    print(f"  cosine(CLS of the two random inputs) = {cos:.4f}")
    print(f"  photo resized to {resized.size}, wide to {wresized.size}")


if __name__ == "__main__":
    main()

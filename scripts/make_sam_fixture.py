#!/usr/bin/env python3
"""Build the tiny random SAM fixture and its reference tensors (transformers `SamModel` +
`SamProcessor`).

Run by hand from the repository root (CPU only, a few seconds):

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_sam_fixture.py

It (re)writes, deterministically:

    tests/fixtures/sam-tiny/config.json        SamConfig of other shapes than ViT-B (see CONFIG)
    tests/fixtures/sam-tiny/model.safetensors  SamModel.save_pretrained
    tests/fixtures/sam/photo-small.png         40x48 crop of photos/dog/00.jpg (upscaled by the
                                               processor: plain bilinear)
    tests/fixtures/sam/photo-large.png         100x84 crop (downscaled: antialiased bilinear)
    tests/fixtures/sam.ref.safetensors         reference tensors, keys in tests/fixtures/README.md

The processor is transformers' `SamImageProcessorPil` (torchvision is not installed) with
`size={"longest_edge": image_size}` and `pad_size` image_size², the tiny model's input size.
Pinned versions: scripts/requirements-fixtures.txt, plus Pillow 13.0.0.
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
from transformers import SamConfig, SamModel, SamProcessor  # noqa: E402
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil  # noqa: E402

from make_fixtures import check_versions, save_safetensors_sorted  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "sam-tiny"
PHOTOS = FIX / "sam"
REF = FIX / "sam.ref.safetensors"
PILLOW = "13.0.0"
IMAGE_SIZE = 64

CONFIG = dict(
    vision_config=dict(
        hidden_size=16, output_channels=12, num_hidden_layers=3, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=8, mlp_dim=24, window_size=3, global_attn_indexes=[1], num_pos_feats=6, qkv_bias=True,
        use_abs_pos=True, use_rel_pos=True, layer_norm_eps=1e-6, hidden_act="gelu",
    ),
    prompt_encoder_config=dict(
        hidden_size=12, image_size=IMAGE_SIZE, patch_size=8, mask_input_channels=8, num_point_embeddings=4,
        hidden_act="gelu", layer_norm_eps=1e-6,
    ),
    mask_decoder_config=dict(
        hidden_size=12, mlp_dim=20, num_hidden_layers=2, num_attention_heads=2, attention_downsample_rate=2,
        num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=10, layer_norm_eps=1e-6, hidden_act="relu",
    ),
)
SEED = 909
# Prompts in pixel coordinates of the original photo (x, y); label 1 = subject, 0 = background.
POINTS = [[20.0, 25.0], [5.0, 3.0]]
LABELS = [1, 0]
BOX = [8.0, 10.0, 33.0, 41.0]


def main() -> None:
    check_versions()
    assert PIL.__version__ == PILLOW, f"Pillow {PIL.__version__}, pinned {PILLOW}"
    torch.manual_seed(SEED)
    config = SamConfig(**CONFIG)
    model = SamModel(config).eval()
    # Random init leaves rel_pos and pos_embed at zero: give every tensor a random value so that
    # each one is exercised by the parity test.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1))
    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT, safe_serialization=True)
    PHOTOS.mkdir(parents=True, exist_ok=True)
    dog = Image.open(FIX / "photos" / "dog" / "00.jpg").convert("RGB")
    small = dog.resize((48, 40), Image.BILINEAR)  # (w, h)
    large = dog.resize((84, 100), Image.BILINEAR)
    small.save(PHOTOS / "photo-small.png")
    large.save(PHOTOS / "photo-large.png")

    ip = SamImageProcessorPil(size={"longest_edge": IMAGE_SIZE}, pad_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    proc = SamProcessor(image_processor=ip)
    ref: dict[str, torch.Tensor] = {}
    for name in ["small", "large"]:
        img = Image.open(PHOTOS / f"photo-{name}.png").convert("RGB")
        enc = proc(images=img, return_tensors="pt")
        ref[f"{name}.pixel_values"] = enc["pixel_values"]
        ref[f"{name}.original_size"] = torch.tensor(enc["original_sizes"][0]).to(torch.int64)
        ref[f"{name}.reshaped_size"] = torch.tensor(enc["reshaped_input_sizes"][0]).to(torch.int64)

    img = Image.open(PHOTOS / "photo-small.png").convert("RGB")
    with torch.no_grad():
        enc = proc(images=img, return_tensors="pt")
        emb = model.get_image_embeddings(enc["pixel_values"])
        ref["image_embeddings"] = emb
        ref["image_pe"] = model.get_image_wide_positional_embeddings()
        cases = {
            "points": dict(input_points=[[POINTS]], input_labels=[[LABELS]]),
            "box": dict(input_boxes=[[BOX]]),
            "both": dict(input_points=[[POINTS[:1]]], input_labels=[[LABELS[:1]]], input_boxes=[[BOX]]),
        }
        for case, prompts in cases.items():
            e = proc(images=img, return_tensors="pt", **prompts)
            for k in ["input_points", "input_labels", "input_boxes"]:
                if k in e:
                    ref[f"{case}.{k}"] = e[k].to(torch.float32)
            sparse, dense = model.get_prompt_embeddings(
                input_points=e.get("input_points"), input_labels=e.get("input_labels"), input_boxes=e.get("input_boxes")
            )
            ref[f"{case}.sparse"] = sparse
            ref[f"{case}.dense"] = dense
            out = model(
                image_embeddings=emb, input_points=e.get("input_points"), input_labels=e.get("input_labels"),
                input_boxes=e.get("input_boxes"), multimask_output=True,
            )
            ref[f"{case}.iou_scores"] = out.iou_scores
            ref[f"{case}.pred_masks"] = out.pred_masks
            logits = proc.post_process_masks(
                out.pred_masks, e["original_sizes"], e["reshaped_input_sizes"], binarize=False
            )[0]
            masks = proc.post_process_masks(out.pred_masks, e["original_sizes"], e["reshaped_input_sizes"])[0]
            ref[f"{case}.mask_logits"] = logits
            ref[f"{case}.masks"] = masks.to(torch.uint8)
            # The single-mask output (mask token 0): `multimask_output=False`.
            out = model(
                image_embeddings=emb, input_points=e.get("input_points"), input_labels=e.get("input_labels"),
                input_boxes=e.get("input_boxes"), multimask_output=False,
            )
            ref[f"{case}.single.iou_scores"] = out.iou_scores
            ref[f"{case}.single.pred_masks"] = out.pred_masks
            ref[f"{case}.single.mask_logits"] = proc.post_process_masks(
                out.pred_masks, e["original_sizes"], e["reshaped_input_sizes"], binarize=False
            )[0]
    meta = {
        "transformers": transformers.__version__, "torch": torch.__version__, "pillow": PIL.__version__,
        "points": json.dumps(POINTS), "labels": json.dumps(LABELS), "box": json.dumps(BOX),
    }
    save_safetensors_sorted({k: v.contiguous() for k, v in ref.items()}, REF, meta)
    print(f"wrote {OUT} ({sum(f.stat().st_size for f in OUT.iterdir())} bytes), {REF} ({REF.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

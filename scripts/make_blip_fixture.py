#!/usr/bin/env python3
"""Build the tiny random BLIP captioner fixture (transformers `BlipForConditionalGeneration`)
and its reference captions.

Run by hand from the repository root (CPU only, a few seconds):

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_blip_fixture.py

It (re)writes, deterministically (a rerun gives byte-identical files):

    tests/fixtures/blip-tiny/config.json                BlipConfig (text_config / vision_config)
    tests/fixtures/blip-tiny/model.safetensors          save_pretrained, fp32 weights
    tests/fixtures/blip-tiny/preprocessor_config.json   BlipImageProcessorPil (32 × 32)
    tests/fixtures/blip-tiny/tokenizer.json, tokenizer_config.json, vocab.txt
                                                        a BERT WordPiece tokenizer with a small
                                                        vocabulary, [DEC] as bos and [ENC] added,
                                                        as Salesforce/blip-image-captioning-base
    tests/fixtures/blip.ref.safetensors                 inputs / outputs (tests/fixtures/README.md)

The layout is that of Salesforce/blip-image-captioning-base (the same config keys, the same
special-token roles: pad 0, sep as the generation's eos, [DEC] as bos; the text config's
eos_token_id is a different, unused id, as there). torchvision is not installed, so transformers
5's default (torchvision) `BlipImageProcessor` is unavailable; the reference uses its PIL
backend `BlipImageProcessorPil`. Pinned versions: scripts/requirements-fixtures.txt (asserted)
plus Pillow 13.0.0.

The reference captions: for each of three photos of different sizes, greedy and beam search
(3 beams), each without and with the prefix "a photography of", at the default max_length 20,
and greedy at max_length 8. The [SEP] logit gets a bias so that some captions end before
max_length (the eos path is exercised), and the script checks that every greedy choice wins by
a clear margin (so float rounding cannot flip a token).
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
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration  # noqa: E402
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil  # noqa: E402

from make_fixtures import check_versions, save_safetensors_sorted, stats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "blip-tiny"
REF = FIX / "blip.ref.safetensors"
PHOTO = FIX / "photos" / "dog" / "00.jpg"
PILLOW = "13.0.0"
SEED = int(os.environ.get("BLIP_SEED", "2"))
PREFIX = "a photography of"
BEAMS = 3

WORDS = """a an the photo photography picture of dog dogs cat on in with and at near sitting standing
lying grass snow beach sky water floor brick wall red blue green brown white black small large
little front table chair street park tree field road car ball backpack toy teapot shoe vase
bowl is are it its that there two three , . ' s ##s ##ing ##ed ##er ##ly ##y""".split()
SPECIALS = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5)


def text_config(vocab_size: int, dec: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=24, encoder_hidden_size=32, intermediate_size=40,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0, bos_token_id=dec,
                eos_token_id=2, sep_token_id=5)


def reinit(model: BlipForConditionalGeneration, g: torch.Generator, sep: int) -> None:
    """A spread of weights that keeps every sublayer visible in the outputs."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "embedding" in name or "class_embedding" in name:
                v = torch.randn(p.shape, generator=g) * 0.5
            elif ("layer_norm" in name or "LayerNorm" in name or "layernorm" in name) and name.endswith("weight"):
                v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=g) / fan_in ** 0.5
            p.copy_(v)
        # [SEP] likely enough that captions end at different lengths
        model.text_decoder.cls.predictions.bias[sep] += 2.5


def photos() -> dict[str, Image.Image]:
    with Image.open(PHOTO) as im:
        im.load()
        rgb = im.convert("RGB")
    a = np.asarray(rgb, dtype=np.uint8)
    return {
        "square": rgb,                                             # 64 × 64
        "wide": Image.fromarray(a[8:56].copy(), mode="RGB"),        # 48 rows × 64 columns
        "tall": Image.fromarray(a[:, 12:52].copy(), mode="RGB"),    # 64 rows × 40 columns
    }


def greedy_margins(model, pixel_values, ids) -> float:
    """The smallest top-1 − top-2 logit gap along a greedy path (teacher-forced)."""
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, input_ids=ids).logits[0]
    n_prompt = 1
    gaps = []
    for pos in range(n_prompt - 1, ids.shape[1] - 1):
        top = logits[pos].topk(2).values
        gaps.append(float(top[0] - top[1]))
    return min(gaps)


def main() -> None:
    check_versions()
    if PIL.__version__ != PILLOW:
        sys.exit(f"make_blip_fixture.py: Pillow {PIL.__version__}, wanted {PILLOW}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(SEED)

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    vocab = SPECIALS + WORDS
    assert len(set(vocab)) == len(vocab)
    (OUT / "vocab.txt").write_text("".join(w + "\n" for w in vocab))
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    dec = tok.convert_tokens_to_ids("[DEC]")
    assert dec == len(vocab), dec
    tok.model_max_length = 512
    tok.save_pretrained(OUT)

    config = BlipConfig(text_config=text_config(len(tok), dec), vision_config=VISION)
    model = BlipForConditionalGeneration(config).eval()
    reinit(model, g, sep=5)
    model.save_pretrained(OUT, safe_serialization=True)
    proc = BlipImageProcessorPil(size={"height": 32, "width": 32})
    proc.save_pretrained(OUT)
    keys = sorted(load_file(OUT / "model.safetensors"))
    print(f"wrote {OUT.relative_to(ROOT)}: {len(keys)} tensors; files {sorted(p.name for p in OUT.iterdir())}")

    model = BlipForConditionalGeneration.from_pretrained(OUT, dtype=torch.float32).eval()
    tok = BertTokenizer.from_pretrained(OUT)
    print("generation config:", model.generation_config.to_diff_dict())
    T: dict[str, torch.Tensor] = {}
    captions: dict[str, str] = {}
    prefix_ids = tok(PREFIX, return_tensors="pt").input_ids
    T["prefix.input_ids"] = prefix_ids.contiguous()
    worst_gap = float("inf")
    for key, img in photos().items():
        T[f"{key}.rgb_u8"] = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        pv = proc(images=img, return_tensors="pt").pixel_values
        T[f"{key}.pixel_values"] = pv.contiguous()
        with torch.no_grad():
            T[f"{key}.image_embeds"] = model.vision_model(pixel_values=pv).last_hidden_state.contiguous()
            bos = torch.tensor([[dec]])
            T[f"{key}.first_logits"] = model(pixel_values=pv, input_ids=bos).logits[:, -1].contiguous()
            pre = prefix_ids.clone()
            pre[:, 0] = dec
            T[f"{key}.prefix_first_logits"] = model(pixel_values=pv, input_ids=pre[:, :-1]).logits[:, -1].contiguous()
        for case, kwargs in {
            "greedy": dict(),
            "greedy_prefix": dict(input_ids=prefix_ids.clone()),
            "beam": dict(num_beams=BEAMS),
            "beam_prefix": dict(num_beams=BEAMS, input_ids=prefix_ids.clone()),
            "greedy_max8": dict(max_length=8),
        }.items():
            with torch.no_grad():
                out = model.generate(pixel_values=pv, **kwargs)
            T[f"{key}.{case}"] = out.contiguous()
            captions[f"{key}.{case}"] = tok.decode(out[0], skip_special_tokens=True).strip()
            if case.startswith("greedy"):
                worst_gap = min(worst_gap, greedy_margins(model, pv, out))
            print(f"  {key:6s} {case:14s} {out.shape[1]:2d} tokens: {captions[f'{key}.{case}']!r}")
    print(f"smallest greedy top-1 − top-2 logit gap: {worst_gap:.4f}")
    assert worst_gap > 1e-3, "a greedy choice is too close to call: change SEED"

    M = {
        "generator": "scripts/make_blip_fixture.py",
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "model": "blip-tiny",
        "prefix": PREFIX,
        "beams": str(BEAMS),
        "captions": json.dumps(captions, sort_keys=True),
        "image_processor": "BlipImageProcessorPil",
        "smallest_greedy_gap": f"{worst_gap:.4f}",
    }
    save_safetensors_sorted(T, REF, M)
    print(f"wrote {REF.relative_to(ROOT)}: {len(T)} tensors")
    for k in sorted(T):
        print(f"    {k:28s} {str(T[k].dtype):14s} {tuple(T[k].shape)}")
    print(f"  square.image_embeds {stats(T['square.image_embeds'])}")
    print(f"  square.first_logits {stats(T['square.first_logits'])}")


if __name__ == "__main__":
    main()

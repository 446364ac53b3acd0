#!/usr/bin/env python3
"""A contact sheet of a world benchmark run: per subject, its photos, the ground truth of each
prompt scene, and one image per prompt of each method, in rows with their labels.

    .venv/bin/python scripts/world_sheet.py RUN WORLD OUT.png --subjects ringed_ball,banded_ball \
        [--methods ti,ti+mask,...] [--image 0] [--scale 2]

RUN is a benchmark --out folder (RUN/units/SUBJECT/METHOD/images/pNN-J.png), WORLD a
`hifi-tuner world --out` folder (dataset/SUBJECT/*.png, ground_truth/SUBJECT/pNN.png). Only
lays out images that exist (a missing one is a grey tile); it reads no scores. Needs Pillow
(`pip install pillow`); a figure for docs/, not part of the tool: the report's HTML has every
image of a run.
"""
import argparse
import os
import sys

from PIL import Image, ImageDraw

METHODS = "ti,ti+mask,ti+mask+reg,ti+mask+reg+stepwise,hifi,db,db+guidance,lora,lora+guidance,base"


def tile(path, size):
    if path and os.path.exists(path):
        return Image.open(path).convert("RGB").resize((size, size), Image.NEAREST)
    return Image.new("RGB", (size, size), (128, 128, 128))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("world")
    ap.add_argument("out")
    ap.add_argument("--subjects", required=True)
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--image", type=int, default=0, help="which image of each prompt (its seed index)")
    ap.add_argument("--scale", type=int, default=2)
    a = ap.parse_args()
    size, label_w, gap = 64 * a.scale, 170, 8
    methods = a.methods.split(",")
    rows = []  # (label, [paths]) per subject, then a gap row (None)
    for s in a.subjects.split(","):
        photos = sorted(os.path.join(a.world, "dataset", s, f)
                        for f in os.listdir(os.path.join(a.world, "dataset", s)) if f.endswith(".png"))
        rows.append((f"{s}: photos", photos[: a.prompts]))
        rows.append(("ground truth", [os.path.join(a.world, "ground_truth", s, f"p{p:02}.png") for p in range(a.prompts)]))
        for m in methods:
            rows.append((m, [os.path.join(a.run, "units", s, m, "images", f"p{p:02}-{a.image}.png")
                             for p in range(a.prompts)]))
        rows.append(None)
    rows = rows[:-1]
    h = sum(size if r else gap for r in rows)
    sheet = Image.new("RGB", (label_w + a.prompts * size, h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for r in rows:
        if r is None:
            y += gap
            continue
        label, paths = r
        draw.text((4, y + size // 2 - 6), label, fill=(0, 0, 0))
        for i, p in enumerate(paths):
            sheet.paste(tile(p, size), (label_w + i * size, y))
        y += size
    tmp = a.out + ".tmp.png"
    # A 256-colour palette (median cut, no dither) keeps a 3-subject sheet at ~0.3 MB instead of
    # ~1 MB for docs/; the report's HTML has the exact images.
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(tmp, optimize=True)
    os.replace(tmp, a.out)
    print(f"wrote {a.out} ({sheet.size[0]}×{sheet.size[1]})", file=sys.stderr)


if __name__ == "__main__":
    main()

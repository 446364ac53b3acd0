#!/usr/bin/env python3
"""IoU of two folders of subject masks, paired by file stem (e.g. hand-drawn vs `hifi-tuner mask`).

    python scripts/mask_iou.py HAND_DIR AUTO_DIR

Masks are binarised at 128 (white = subject); a pair of different sizes is compared after
resizing the second to the first (nearest). `*.overlay.png` files are ignored. Prints one line
per stem and the mean IoU. Not run in CI: it is for measuring mask quality with real weights.
Needs numpy and Pillow.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

EXT = {".png", ".jpg", ".jpeg"}


def masks(d: Path) -> dict:
    return {p.stem: p for p in sorted(d.iterdir()) if p.suffix.lower() in EXT and not p.name.endswith(".overlay.png")}


def load(p: Path, size=None) -> np.ndarray:
    im = Image.open(p).convert("L")
    if size is not None and im.size != size:
        im = im.resize(size, Image.NEAREST)
    return np.asarray(im) >= 128


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = masks(Path(sys.argv[1])), masks(Path(sys.argv[2]))
    common = sorted(set(a) & set(b))
    if not common:
        sys.exit("no stems in common")
    for s in sorted(set(a) ^ set(b)):
        print(f"{s}: only in one folder", file=sys.stderr)
    ious = []
    for s in common:
        ma = load(a[s])
        mb = load(b[s], size=(ma.shape[1], ma.shape[0]))
        union = np.logical_or(ma, mb).sum()
        iou = 1.0 if union == 0 else np.logical_and(ma, mb).sum() / union
        ious.append(iou)
        print(f"{s}\t{iou:.4f}")
    print(f"mean\t{np.mean(ious):.4f}\t({len(ious)} masks)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Build the EXIF-orientation fixture: a photo stored sideways with Orientation = 6, as phones
write them, and its mask drawn upright.

Run by hand from the repository root (Pillow only, no network, a second):

    /work/main/.venv/bin/python scripts/make_exif_fixture.py

It writes:

    tests/fixtures/photos/exif/rotated.jpg        stored 64x32 (W x H), EXIF Orientation = 6
                                                  ("rotate 90° clockwise to display"): shown
                                                  upright it is 32x64: the top half red (left)
                                                  and green (right), the bottom half blue
    tests/fixtures/photos/exif-masks/rotated.png  the upright 32x64 mask: the top half white

and checks that Pillow's `ImageOps.exif_transpose` (what diffusers' `train_dreambooth.py`
applies to every instance photo) shows the JPEG as the upright drawing.
"""

from pathlib import Path

from PIL import Image, ImageOps

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (30, 40, 220)
W, H = 32, 64  # the upright photo


def upright() -> Image.Image:
    img = Image.new("RGB", (W, H), BLUE)
    img.paste(Image.new("RGB", (W // 2, H // 2), RED), (0, 0))
    img.paste(Image.new("RGB", (W // 2, H // 2), GREEN), (W // 2, 0))
    return img


def main() -> None:
    root = Path("tests/fixtures/photos")
    (root / "exif").mkdir(parents=True, exist_ok=True)
    (root / "exif-masks").mkdir(parents=True, exist_ok=True)
    up = upright()
    # Orientation 6: the viewer rotates the stored pixels 90° clockwise, so store them rotated
    # 90° counter-clockwise (PIL's ROTATE_90 is counter-clockwise).
    stored = up.transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = root / "exif" / "rotated.jpg"
    stored.save(path, quality=95, subsampling=0, exif=exif.tobytes())

    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (0, 0, W, H // 2))
    mask.save(root / "exif-masks" / "rotated.png")

    shown = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert shown.size == (W, H), shown.size
    for (x, y), want in [((4, 4), RED), ((W - 5, 4), GREEN), ((W // 2, H - 5), BLUE)]:
        got = shown.getpixel((x, y))
        assert all(abs(a - b) <= 8 for a, b in zip(got, want)), (x, y, got, want)
    print(f"wrote {path} ({path.stat().st_size} bytes) and its mask")


if __name__ == "__main__":
    main()

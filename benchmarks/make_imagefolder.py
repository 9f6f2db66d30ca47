"""Write a small ImageNet-like image folder (JPEGs of ImageNet's typical size) so that
`vitkdl bench` can time the `imagefolder` loader with the recipe's real transforms.

    python benchmarks/make_imagefolder.py /tmp/vitkdl_bench_images [--classes 10] [--per-class 32]

The images are smooth random patterns plus noise (about 60-110 KB each at 500x375, quality 90),
so decoding costs about what a real ImageNet JPEG costs; the content is meaningless.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_folder(root: Path, classes: int, per_class: int, seed: int = 0) -> None:
    """``root/train/<class>/*.jpg`` (``per_class`` each) and ``root/val/<class>/*.jpg``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", max(1, per_class // 8))):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                path = folder / f"{split}_{c}_{i}.jpg"
                if path.exists():
                    continue
                small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
                pixels = np.asarray(image, dtype=np.int16)
                pixels = pixels + rng.integers(-24, 25, pixels.shape, dtype=np.int16)
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=32)
    args = parser.parse_args()
    write_folder(args.root, args.classes, args.per_class)
    print(args.root)


if __name__ == "__main__":
    main()

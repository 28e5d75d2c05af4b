"""A multi-domain image dataset of your own, generated: the worked example of the docs' "Your own dataset".

    python examples/own_dataset.py toy_shapes            # writes toy_shapes/<domain>/<class>/<image>
    python train.py dataset=image_folders data_dir=toy_shapes test_envs=[2] ...

Three classes of shapes (circle, square, triangle) in three domains that differ in how they are drawn:
``outline`` (black strokes on white), ``filled`` (solid shapes on a coloured background), ``noisy`` (filled
shapes under pixel noise, as PNG files: the app reads JPEG and PNG alike). Any tree
``<domain>/<class>/<image>`` with the same class folders in every domain trains the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DOMAINS = ("filled", "noisy", "outline")
CLASSES = ("circle", "square", "triangle")


def draw_shape(shape: str, domain: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = (255, 255, 255) if domain == "outline" else tuple(int(v) for v in rng.integers(0, 256, 3))
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = rng.uniform(0.45, 0.8) * size  # the shape's size and place vary from image to image
    left, top = rng.uniform(0, size - extent, 2)
    box = (left, top, left + extent, top + extent)
    fill, outline = (None, (0, 0, 0)) if domain == "outline" else (colour, None)
    width = max(size // 20, 1)
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    else:
        points = [(left + extent / 2, top), (left, top + extent), (left + extent, top + extent)]
        draw.polygon(points, fill=fill, outline=outline, width=width)
    if domain == "noisy":
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-60, 61, (size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def write_toy_dataset(root: Path, images_per_class: int = 40, size: int = 64, seed: int = 0) -> Path:
    """``root/<domain>/<class>/<i>.jpg`` (``.png`` in the ``noisy`` domain); returns ``root``."""
    rng = np.random.default_rng(seed)
    for domain in DOMAINS:
        for shape in CLASSES:
            folder = Path(root) / domain / shape
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(images_per_class):
                image = draw_shape(shape, domain, size, rng)
                if domain == "noisy":
                    image.save(folder / f"{index:03d}.png")
                else:
                    image.save(folder / f"{index:03d}.jpg", quality=90)
    return Path(root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the directory to write (the app's data_dir)")
    parser.add_argument("--images-per-class", type=int, default=40)
    parser.add_argument("--size", type=int, default=64, help="the images' side in pixels")
    args = parser.parse_args()
    write_toy_dataset(args.root, args.images_per_class, args.size)
    print(f"Wrote {args.root}. Train with: python train.py dataset=image_folders data_dir={args.root} test_envs=[2]")

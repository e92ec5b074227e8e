"""Catalog-like photos rendered from Fashion-MNIST images, and broken files, for the tagging tests.

A catalog photo is the reverse of how Fashion-MNIST was made: a dark item on a light, slightly tinted
background, many times larger, with margins, in colour, saved as JPEG, PNG or WebP; some are grayscale,
some RGBA cut-outs on a transparent background.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = ("jpg", "png", "webp", "png-rgba", "png-gray")


def render(image: np.ndarray, rng: np.random.Generator, scales: tuple[int, int] = (4, 9),
           kinds: tuple[str, ...] = FORMATS) -> tuple[Image.Image, str]:
    """A photo of the (28, 28) light-on-dark `image`, and the file kind to save it as: the item `scales` times
    larger (112-224 px by default: small, as the tests make hundreds), in one of `kinds`."""
    scale = int(rng.integers(*scales))
    side = 28 * scale
    ink = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    kind = kinds[int(rng.integers(len(kinds)))]
    tint = rng.uniform(232, 252, size=3) if kind != "png-rgba" else np.full(3, 255.0)
    item_colour = rng.uniform(0, 40, size=3)  # near black, a little coloured
    rgb = tint * (1 - ink[..., None]) + item_colour * ink[..., None]
    # Margins of their own on each side, so the canvas is not square and the item is off centre.
    top, bottom, left, right = (int(m) for m in rng.integers(side // 10, side // 3, size=4))
    canvas = np.empty((side + top + bottom, side + left + right, 3), dtype=np.float32)
    canvas[:] = tint
    canvas[top : top + side, left : left + side] = rgb
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * 1.5  # sensor noise
    photo = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    if kind == "png-rgba":
        alpha = np.zeros(canvas.shape[:2], dtype=np.uint8)
        alpha[top : top + side, left : left + side] = np.where(ink > 0.02, 255, 0)
        photo.putalpha(Image.fromarray(alpha))
    elif kind == "png-gray":
        photo = photo.convert("L")
    return photo, kind


def save(photo: Image.Image, kind: str, stem: Path) -> Path:
    suffix = {"jpg": ".jpg", "webp": ".webp"}.get(kind, ".png")
    path = stem.with_suffix(suffix)
    if kind in ("jpg", "webp"):
        photo.save(path, quality=90)
    else:
        photo.save(path)
    return path


def write_catalog(folder: Path, images: np.ndarray, seed: int = 0, **style) -> list[Path]:
    """One photo per image, named by its index (photo-00042.jpg); returns the paths in image order. `style`:
    `render`'s scales and kinds."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    return [save(*render(image, rng, **style), folder / f"photo-{i:05d}") for i, image in enumerate(images)]


def write_broken(folder: Path) -> dict[str, str]:
    """Files that cannot be tagged, each with a word its error must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not a picture\n")
    whole = folder / "whole.jpg"
    Image.fromarray(np.full((200, 150, 3), 240, dtype=np.uint8)).save(whole, quality=90)
    data = whole.read_bytes()
    whole.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return {"empty.jpg": "empty", "notes.png": "not an image", "truncated.jpg": "truncated"}


# A store's photos as the catalog benchmarks have them: about 1000 px across (the item 26-27 times its 28 px,
# margins around it), JPEG.
LARGE = {"scales": (26, 28), "kinds": ("jpg",)}

# Photos a class in the catalog tests' shop (tests/conftest.py).
PER_CLASS = 150

# A store's own classes for the catalog tests: four well-separated Fashion-MNIST classes, under its names.
STORE_CLASSES = {"bags": 8, "dresses": 3, "sneakers": 7, "trousers": 1}


def write_labelled_catalog(folder: Path, images: np.ndarray, labels: np.ndarray, per_class: int, seed: int = 0,
                           skip: int = 0, **style) -> dict[str, list[Path]]:
    """PATH/<class>/<photos>: `per_class` photos of each of STORE_CLASSES, rendered from the first images of
    that Fashion-MNIST class after the first `skip` of them; returns the paths by class."""
    written = {}
    for name, label in STORE_CLASSES.items():
        chosen = images[labels == label][skip : skip + per_class]
        written[name] = write_catalog(folder / name, chosen, seed=seed + label, **style)
    return written


def write_broken_into_classes(folder: Path) -> dict[str, str]:
    """One file that cannot be read in each class folder; {relative path: a word its reason contains}."""
    broken = {}
    for name, (file, word) in zip(sorted(STORE_CLASSES), write_broken(folder / ".broken").items()):
        (folder / ".broken" / file).rename(folder / name / file)
        broken[f"{name}/{file}"] = word
    blank = folder / sorted(STORE_CLASSES)[-1] / "blank.png"
    Image.new("RGB", (64, 64), (240, 238, 230)).save(blank)
    broken[f"{blank.parent.name}/{blank.name}"] = "no item found"
    (folder / ".broken").rmdir()
    return broken

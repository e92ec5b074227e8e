"""Catalog photos into the model's domain, the way Fashion-MNIST itself was made.

Zalando made Fashion-MNIST from its product photos (Xiao, Rasul and Vollgraf, 2017): trim the edges close
to the colour of the corner pixels, resize the longest edge to 28, sharpen, extend the shorter edge to 28
with the item centred, negate the intensities, 8-bit grayscale. `to_model_image` does the same to a photo, so that
what reaches the model is what it was trained on: a light item on a black 28x28 background. From there
tagging shares everything with training and evaluation: `clf.data.preprocess` and `clf.infer.Predictor`.

Handles: one item on a plain, light background (white or slightly tinted, shadows mild), any size, RGB,
RGBA (transparent parts count as white) or grayscale, JPEG, PNG or WebP. Does not handle: photos of people
wearing the item, several items in one photo, busy or dark backgrounds, items as light as their background
(a white shirt on white): these come out with low confidence or wrong and should go to review.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from clf import storage
from clf.data import IMAGE_SIZE
from clf.errors import first_line

# Fashion-MNIST trimmed "edges close to the colour of the corner pixels" at a 5% distance; photos with
# sensor noise or JPEG artefacts need the larger of that and a few noise widths of their border.
TRIM_THRESHOLD = 0.05 * 255
NOISE_WIDTHS = 4
# Fashion-MNIST sharpened after resizing; without it a downscaled photo is softer than the training
# images (on rendered test photos: 95% agreement with the original images' predictions, against 93.5%).
SHARPEN = ImageFilter.UnsharpMask(radius=1, percent=100, threshold=0)
# Larger than any catalog photo and below Pillow's decompression-bomb limit.
MAX_PIXELS = 80_000_000


class PhotoError(ValueError):
    """Why a file could not be tagged, in a few words for its row's `error`."""


def decode(data: bytes) -> Image.Image:
    """The photo in `data`, fully decoded (a truncated file fails here, not later)."""
    if not data:
        raise PhotoError("empty file (zero bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise PhotoError(f"image too large ({image.width}x{image.height} pixels)")
            image.load()
    except PhotoError:
        raise
    except UnidentifiedImageError:
        raise PhotoError("not an image (unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PhotoError("image too large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise PhotoError(f"truncated or corrupt image ({first_line(e)})") from None
    return ImageOps.exif_transpose(image)  # as a camera's orientation tag says it is shown


def to_gray(image: Image.Image) -> np.ndarray:
    """(H, W) float32 intensities 0-255; transparent parts become white, as on a product page."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32)


def to_model_image(image: Image.Image) -> np.ndarray:
    """A (28, 28) uint8 light-on-dark image of the item in the photo, as Fashion-MNIST lays one out."""
    gray = to_gray(image)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if background < 96:
        raise PhotoError("dark background (the model knows items on light backgrounds only)")
    calm = border[np.abs(border - background) < TRIM_THRESHOLD]  # the border's background pixels
    threshold = max(TRIM_THRESHOLD, NOISE_WIDTHS * float(np.std(calm)) if calm.size else 0.0)
    # A 3x3 median first, so a stray noisy pixel does not widen the item's box.
    darker = np.clip(background - gray, 0, 255).astype(np.uint8)
    smoothed = np.asarray(Image.fromarray(darker).filter(ImageFilter.MedianFilter(3)), dtype=np.float32)
    rows, cols = np.nonzero(smoothed > threshold)
    if len(rows) == 0:
        raise PhotoError("no item found (the image is blank)")
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1

    # Negate against the photo's own background, so a tinted one also becomes black.
    item = np.clip((background - gray[top:bottom, left:right]) * (255.0 / background), 0, 255)
    height, width = item.shape
    scale = IMAGE_SIZE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    fitted = Image.fromarray(item.astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    canvas.paste(fitted, ((IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2))
    return np.asarray(canvas.filter(SHARPEN), dtype=np.uint8)


def load(data: bytes) -> np.ndarray:
    """File bytes to the model's 28x28 image; PhotoError says why not."""
    return to_model_image(decode(data))


def read_photos(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data task: each row's file (column `path`, a local path or a URI) read and brought into the
    model's domain as `image`, or `error` says why it could not be; `size`, the bytes read (-1 when none
    were); the other columns pass through. One bad file never stops the job."""
    paths = batch["path"]
    images = np.zeros((len(paths), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    errors = np.full(len(paths), "", dtype=object)
    sizes = np.full(len(paths), -1, dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            if not path:
                raise PhotoError("empty path")
            data = storage.read_location(path)  # a remote read that fails for a moment is tried again
            sizes[i] = len(data)
            images[i] = load(data)
        except PhotoError as e:
            errors[i] = str(e)
        except FileNotFoundError:
            errors[i] = "file not found"
        except IsADirectoryError:
            errors[i] = "a folder, not a file"
        except PermissionError:
            errors[i] = "permission denied"
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the job; its row says why
            errors[i] = f"could not read or decode ({type(e).__name__}: {first_line(e)})"
    return batch | {"image": images, "error": errors, "size": sizes}


def load_file(path: str) -> np.ndarray:
    """A photo file (a local path, or a URI pyarrow reads: file://, s3://, gs://) to the model's 28x28
    image; PhotoError (or OSError) says why not."""
    if not path:
        raise PhotoError("empty path")
    return load(storage.read_location(path))

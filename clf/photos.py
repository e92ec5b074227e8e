"""Catalog photos into the model's domain, the way Fashion-MNIST itself was made. Training on a catalog and
tagging both read photos through here; decode tasks import it, so it imports neither torch nor pandas.

Zalando made Fashion-MNIST from its product photos (Xiao, Rasul and Vollgraf, 2017): trim the edges close
to the colour of the corner pixels, resize the longest edge to 28, sharpen, extend the shorter edge to 28
with the item centred, negate the intensities, 8-bit grayscale. `to_model_image` does the same to a photo, so that
what reaches the model is what it was trained on: a light item on a black 28x28 background. From there
tagging shares everything with training and evaluation: `clf.data.preprocess` and `clf.predictor.Predictor`.

A photo is decoded at the smallest scale that keeps the detail a 28x28 result needs (DECODE_SIDE): a 1000 px
JPEG in the DCT domain at 1/4 or 1/8 of its size, other formats reduced once decoded; then trimmed,
resized and sharpened as above.

Handles: one item on a plain, light background (white or slightly tinted, shadows mild), any size, RGB,
RGBA (transparent parts count as white) or grayscale, JPEG, PNG or WebP. Does not handle: photos of people
wearing the item, several items in one photo, busy or dark backgrounds, items as light as their background
(a white shirt on white): these come out with low confidence or wrong and should go to review.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from clf import storage
from clf.errors import first_line

IMAGE_SIZE = 28  # the model's images: IMAGE_SIZE x IMAGE_SIZE, as Fashion-MNIST's
# The longer side a photo is decoded at, at least: DECODE_SIDE / IMAGE_SIZE = 8 pixels of photo for each pixel
# of the result, before the trim (the item fills about half to all of a product photo). A 1000 px JPEG
# decodes at 1/4 of its size (250 px), in the DCT domain; other formats are reduced after decoding.
# Against decoding whole: docs/performance.md ("Photos"), from benchmarks/ingest.py.
DECODE_SIDE = 224

# Fashion-MNIST trimmed "edges close to the colour of the corner pixels" at a 5% distance; photos with
# sensor noise or JPEG artefacts need the larger of that and a few noise widths of their border.
TRIM_THRESHOLD = 0.05 * 255
NOISE_WIDTHS = 4
# Fashion-MNIST sharpened after resizing; without it a downscaled photo is softer than the training
# images, and its predictions agree less often with the original images' (tests/test_tag.py's photos).
SHARPEN = ImageFilter.UnsharpMask(radius=1, percent=100, threshold=0)
# Larger than any catalog photo and below Pillow's decompression-bomb limit.
MAX_PIXELS = 80_000_000


class PhotoError(ValueError):
    """Why a file could not be tagged, in a few words for its row's `error`."""


def decode(data: bytes, side: int | None = DECODE_SIDE) -> Image.Image:
    """The photo in `data`, decoded at the smallest scale whose longer side is still `side` pixels or more
    (None: whole), all of it (a truncated file fails here, not later)."""
    if not data:
        raise PhotoError("empty file (zero bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise PhotoError(f"image too large ({image.width}x{image.height} pixels)")
            factor = max(image.size) / side if side else 1.0
            if factor >= 2 and image.format == "JPEG":
                # The JPEG decoder scales by 1/2, 1/4 or 1/8 in the DCT domain, to no less than the size asked.
                image.draft(image.mode, (math.ceil(image.width / factor), math.ceil(image.height / factor)))
            image.load()
            if factor >= 2 and max(image.size) >= 2 * side:  # other formats: a box filter, by a whole factor
                image = image.reduce(int(max(image.size) // side))
    except PhotoError:
        raise
    except UnidentifiedImageError:
        raise PhotoError("not an image (unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PhotoError("image too large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise PhotoError(f"truncated or corrupt image ({first_line(e)})") from None
    return ImageOps.exif_transpose(image)  # as a camera's orientation tag says it is shown


def on_white(image: Image.Image) -> Image.Image:
    """The image with its transparent parts white, as on a product page (one without transparency as it is)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image


def to_gray(image: Image.Image) -> np.ndarray:
    """(H, W) float32 intensities 0-255; transparent parts become white."""
    return np.asarray(on_white(image).convert("L"), dtype=np.float32)


def to_model_image(image: Image.Image) -> np.ndarray:
    """A (28, 28) uint8 light-on-dark image of the item in the photo, as Fashion-MNIST lays one out."""
    gray = to_gray(image)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if background < 96:
        raise PhotoError("dark background (the model knows items on light backgrounds only)")
    calm = border[np.abs(border - background) < TRIM_THRESHOLD]  # the border's background pixels
    threshold = max(TRIM_THRESHOLD, NOISE_WIDTHS * float(np.std(calm)) if calm.size else 0.0)
    # The item's pixels after a 3x3 median, so a stray noisy pixel does not widen its box.
    rows, cols = np.nonzero(_median3_above(background - gray, threshold))
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


def _median3_above(values: np.ndarray, threshold: float) -> np.ndarray:
    """Where the 3x3 median of `values` (edges repeated outwards) is above `threshold`: where at least 5 of
    the 9 values around are, the same thing counted on a mask (much faster than Pillow's MedianFilter on the
    whole image; equal masks on the catalog and test photos)."""
    above = np.pad(values > threshold, 1, mode="edge").astype(np.uint8)
    height, width = values.shape
    return sum(above[i:i + height, j:j + width] for i in range(3) for j in range(3)) >= 5


def load(data: bytes, side: int | None = DECODE_SIDE) -> np.ndarray:
    """File bytes to the model's 28x28 image; PhotoError says why not. `side`: see `decode`."""
    return to_model_image(decode(data, side))


# A thumbnail's longer side (review.html shows each photo to review at this size).
THUMBNAIL_SIDE = 160


def thumbnail(image: Image.Image) -> bytes:
    """A JPEG of the decoded photo (`decode`'s), its longer side THUMBNAIL_SIDE pixels at most; transparent parts
    white, as on a product page."""
    small = image.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
    encoded = io.BytesIO()
    on_white(small).convert("RGB").save(encoded, "JPEG", quality=80)
    return encoded.getvalue()


def read_photos(batch: dict[str, np.ndarray], keep_decoded: bool = False) -> dict[str, np.ndarray]:
    """Ray Data task: each row's file (column `path`, a local path or a URI) read and brought into the
    model's domain as `image`, or `error` says why it could not be; `size`, the bytes read (-1 when none
    were); with `keep_decoded`, `decoded`, each photo as decoded (a PIL image, None where it could not be:
    what a thumbnail is made from, in the same process); the other columns pass through. One bad file never
    stops the job. The files are read through one filesystem per bucket, remote ones several at a time
    (`storage.read_each`)."""
    paths = batch["path"]
    images = np.zeros((len(paths), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    errors = np.full(len(paths), "", dtype=object)
    sizes = np.full(len(paths), -1, dtype=np.int64)
    decoded = np.full(len(paths), None, dtype=object)
    for i, data in enumerate(storage.read_each([str(p) for p in paths])):
        try:
            if data is None:
                raise PhotoError("empty path")
            if isinstance(data, Exception):
                raise data
            sizes[i] = len(data)
            photo = decode(data)
            images[i] = to_model_image(photo)
            if keep_decoded:
                decoded[i] = photo
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
    return batch | {"image": images, "error": errors, "size": sizes} | ({"decoded": decoded} if keep_decoded else {})


def read_rows(ids: np.ndarray, paths: np.ndarray, labels: np.ndarray):
    """A Ray task of the training job's read pass: the photos of rows (id, path, label) read and converted.
    Returns (what became of each row: {"id", "error", "size"}, an Arrow table (id, path, label, image: 28x28
    uint8 as Arrow's own fixed-shape tensor type, which Ray Data reads) of the rows that could be read)."""
    import pyarrow as pa

    batch = read_photos({"id": ids, "path": paths, "label": labels})
    ok = batch["error"] == ""
    table = pa.table({"id": ids[ok], "path": paths[ok].astype(str), "label": labels[ok],
                      "image": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(batch["image"][ok]))})
    return {"id": ids, "error": batch["error"], "size": batch["size"]}, table


def load_file(path: str) -> np.ndarray:
    """A photo file (a local path, or a URI pyarrow reads: file://, s3://, gs://) to the model's 28x28
    image; PhotoError (or OSError) says why not."""
    if not path:
        raise PhotoError("empty path")
    return load(storage.read_location(path))

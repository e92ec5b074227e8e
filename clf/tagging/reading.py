"""Tagging's one pass over each photo: read and convert it (`clf.photos`), predict it (`clf.predictor`), and make
a thumbnail of each one the model is unsure of, for review.html, from the photo as it was decoded, in the same
process. No torch on CPUs: a Ray Data actor imports this module.

On CPUs one actor does all of it for a block of photos (`PhotoTagger`): the decoded photos never leave it, and
only the unsure get a thumbnail. With GPUs, CPU tasks read and convert (`read_for_review`) and GPU actors
predict: the thumbnail is made where the photo is decoded, for every photo, and the driver keeps those of the
unsure.
"""

from __future__ import annotations

import numpy as np

from clf import photos
from clf.predictor import Predictor
from clf.tagging.rows import TOP_K


class PhotoTagger:
    """A Ray Data actor of tagging on CPUs: a block of rows (`index`, `path`) in, the predictor's columns out
    (`top_classes`, `top_probs`, ...), each row's `error` and `size`, and `thumbnail` (JPEG bytes, or empty) for
    each photo whose confidence is below `review_threshold`."""

    def __init__(self, model, review_threshold: float, num_threads: int = 1):
        self.predictor = Predictor(model, num_threads=num_threads, top_k=TOP_K)
        self.review_threshold = review_threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        read = photos.read_photos(batch, keep_decoded=True)
        decoded = read.pop("decoded")
        out = self.predictor(read)
        unsure = (out["error"] == "") & (out["confidence"] < self.review_threshold)
        out["thumbnail"] = np.array([photos.thumbnail(photo) if review else b"" for photo, review in zip(decoded, unsure)],
                                    dtype=object)
        return out


def read_for_review(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Ray Data task of tagging with GPUs: the block's photos read and converted, with a thumbnail of each that
    could be read (whether it needs review is known only once the GPU actor has predicted it)."""
    read = photos.read_photos(batch, keep_decoded=True)
    decoded = read.pop("decoded")
    read["thumbnail"] = np.array([b"" if photo is None else photos.thumbnail(photo) for photo in decoded], dtype=object)
    return read

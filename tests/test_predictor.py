"""The predictor's engines against the torch model they stand for: ONNX Runtime on the CPU (the checkpoint's
model.onnx), torch on a GPU where there is one; the same class for every image and probabilities within 1e-5.
The real model on all 10,000 test images: tests/test_job.py (the one-epoch run's checkpoint)."""

import numpy as np
import pytest
import torch

from clf import checkpoint, data, predictor
from clf.errors import CheckpointError
from clf.model import FashionCNN


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("ckpt")
    checkpoint.save(folder, FashionCNN(channels=(4, 8), hidden=16), data.CLASSES)
    return checkpoint.read(str(folder))


def torch_probabilities(files, images: np.ndarray) -> np.ndarray:
    model = checkpoint.inference_model(checkpoint.build(files)[0])
    with torch.inference_mode():
        return model(torch.from_numpy(images)).numpy()


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def check_against_torch(out: dict, expected: np.ndarray, top_k: int) -> None:
    order = np.argsort(-expected, axis=1, kind="stable")
    np.testing.assert_array_equal(out["prediction"], order[:, 0])
    np.testing.assert_allclose(out["confidence"], expected.max(axis=1), atol=1e-5)
    np.testing.assert_array_equal(out["top_classes"], order[:, :top_k])
    np.testing.assert_allclose(out["top_probs"], np.take_along_axis(expected, order[:, :top_k], axis=1), atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_onnx_runtime_gives_torchs_classes_and_probabilities(files, threads):
    batch = images(500, seed=1)
    expected = torch_probabilities(files, batch)
    assert len(np.unique(expected.argmax(1))) >= 3  # otherwise a wrong class could go unseen
    out = predictor.Predictor(files, num_threads=threads, top_k=3)({"id": np.arange(500), "image": batch.copy()})
    assert out["id"].tolist() == list(range(500))  # the other columns pass through
    check_against_torch(out, expected, top_k=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/device.sh runs it on one)")
def test_the_gpu_engine_gives_torchs_classes_and_probabilities(files):
    batch = images(500, seed=2)
    out = predictor.Predictor(files, use_gpu=True, top_k=3)({"image": batch.copy()})
    check_against_torch(out, torch_probabilities(files, batch), top_k=3)


def test_a_model_onnx_runtime_cannot_load_or_of_other_classes_is_refused(files):
    from dataclasses import replace

    with pytest.raises(CheckpointError, match="its ONNX model cannot be loaded"):
        predictor.check(replace(files, onnx=b"not an onnx model"))
    with pytest.raises(CheckpointError, match="names 3 classes for a model of 10 outputs"):
        predictor.check(replace(files, description=files.description | {"classes": ["a", "b", "c"]}))
    predictor.check(files)


def test_the_predictor_imports_no_torch():
    import subprocess
    import sys

    from tests.helpers import ROOT

    probe = ("import sys; import clf.predictor, clf.serving, clf.tagging.rows, clf.photos; "
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

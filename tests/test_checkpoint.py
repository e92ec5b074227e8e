import json
import pickle

import pytest
import torch

from clf import checkpoint, data
from clf.checkpoint import CheckpointError
from clf.model import FashionCNN


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = FashionCNN(channels=(4, 8), hidden=16)
    checkpoint.save(tmp_path / "ckpt", model, data.CLASSES, {"epoch": 1})
    return tmp_path / "ckpt", model


def test_round_trip(saved):
    folder, model = saved
    loaded, classes = checkpoint.load_model(folder)
    assert classes == list(data.CLASSES)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
    assert checkpoint.load_train_state(folder) == {"epoch": 1}


class Payload:
    """Unpickling this runs code: it writes a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_its_code_does_not_run(saved, tmp_path):
    folder, _ = saved
    marker = tmp_path / "pwned"
    with open(folder / checkpoint.WEIGHTS, "wb") as f:
        pickle.dump({"weight": Payload(marker)}, f)
    with pytest.raises(CheckpointError, match="refused to load .*model.pt: it holds more than tensors"):
        checkpoint.load_model(folder)
    assert not marker.exists()


@pytest.mark.parametrize("missing", [checkpoint.WEIGHTS, checkpoint.MODEL_CONFIG, checkpoint.ONNX])
def test_missing_files(saved, missing):
    folder, _ = saved
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=f"has no {missing}"):
        checkpoint.load_model(folder)


def test_checkpoint_of_another_shape(saved):
    folder, _ = saved
    meta = json.loads((folder / checkpoint.MODEL_CONFIG).read_text())
    meta["model"]["channels"] = [8, 16]
    (folder / checkpoint.MODEL_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit the model it describes"):
        checkpoint.load_model(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nothing")


def test_an_onnx_model_that_is_not_the_described_one_is_refused(saved):
    folder, _ = saved
    other = tmp_onnx = folder.parent / "other"
    torch.manual_seed(1)
    checkpoint.save(other, FashionCNN(channels=(4, 8), hidden=16), data.CLASSES)
    (folder / checkpoint.ONNX).write_bytes((tmp_onnx / checkpoint.ONNX).read_bytes())
    with pytest.raises(CheckpointError, match="model.onnx is not the model model.json describes"):
        checkpoint.read(str(folder))


def test_a_checkpoint_from_before_onnx_gets_its_onnx_model_on_reading(saved):
    folder, _ = saved
    written = checkpoint.read(str(folder))
    (folder / checkpoint.ONNX).unlink()
    meta = json.loads((folder / checkpoint.MODEL_CONFIG).read_text())
    del meta["onnx_sha256"]
    (folder / checkpoint.MODEL_CONFIG).write_text(json.dumps(meta))
    exported = checkpoint.read(str(folder))
    # The same model in both: the export is of the weights, deterministic.
    assert exported.onnx == written.onnx and exported.description == written.description

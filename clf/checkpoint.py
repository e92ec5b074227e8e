"""The checkpoint directory and the one way to load a model from it: `read` its files (a local folder or a
URI), `build` the torch model (resume, the GPU predictor and `load_model` do), or hand its ONNX model to ONNX
Runtime (the CPU predictor, `clf.predictor`).

Layout:
    model.pt        the model's state_dict (tensors only: loaded with weights_only=True)
    model.onnx      the same model for inference: uint8 images (N, 28, 28) in, class probabilities (N, classes)
                    out, preprocessing and softmax inside (`InferenceModel`), a dynamic batch
    model.json      the model's constructor arguments, the class names in class-index order, the run's name, and
                    the ONNX model's SHA-256
    train_state.pt  optimizer, schedule and epoch, for resuming (not needed for inference)

This module imports torch only where it saves, exports or builds a torch model: reading a checkpoint's files,
as the predictor's processes do, needs none.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import posixpath
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from clf import storage
from clf.errors import CheckpointError, first_line

if TYPE_CHECKING:
    import torch

    from clf.model import FashionCNN

WEIGHTS = "model.pt"
ONNX = "model.onnx"
MODEL_CONFIG = "model.json"
TRAIN_STATE = "train_state.pt"
# Where a training run's outputs keep the final model.
RUN_CHECKPOINT = "checkpoint"
# The ONNX operator set the model is exported with (ONNX Runtime 1.31 runs up to 23).
OPSET = 17


def save(folder: str | Path, model: torch.nn.Module, classes, train_state: dict | None = None,
         run: str | None = None, mlflow_run_id: str | None = None) -> None:
    """`run`: the training run's name, which serving's answers name the model by; `mlflow_run_id`: its MLflow
    run, if tracked, which tagging's runs link to."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    torch.save(model.state_dict(), folder / WEIGHTS)
    onnx = export_onnx(model)
    (folder / ONNX).write_bytes(onnx)
    (folder / MODEL_CONFIG).write_text(
        json.dumps({"model": model.config, "classes": list(classes), "run": run, "mlflow_run_id": mlflow_run_id,
                    "onnx_sha256": hashlib.sha256(onnx).hexdigest()}, indent=2) + "\n"
    )
    if train_state is not None:
        torch.save(train_state, folder / TRAIN_STATE)


def inference_model(model: FashionCNN):
    """`model` as inference runs it: uint8 images (N, 28, 28) in, softmax probabilities out, with the one
    preprocessing (`clf.data.preprocess`) inside."""
    import torch

    from clf.data import preprocess

    class InferenceModel(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, images):
            return torch.softmax(self.model(preprocess(images)), dim=1)

    return InferenceModel(model).eval()


def export_onnx(model: FashionCNN) -> bytes:
    """The ONNX model of `model` (its `inference_model`), with a dynamic batch axis. TorchScript's exporter
    (dynamo=False): it needs no package beyond torch, and gives the same classes and probabilities within 1e-7
    (tests/test_predictor.py). `model` is left in the mode it was in."""
    import torch

    was_training = model.training
    exported = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own deprecation
        torch.onnx.export(inference_model(model), (torch.zeros(1, 28, 28, dtype=torch.uint8),), exported,
                          dynamo=False, opset_version=OPSET, input_names=["image"], output_names=["probabilities"],
                          dynamic_axes={"image": {0: "images"}, "probabilities": {0: "images"}})
    model.train(was_training)
    return exported.getvalue()


@dataclass(frozen=True)
class ModelFiles:
    """What inference needs of a checkpoint, read once (on the driver) and handed to the predictors through
    Ray's object store: no actor opens a path, which on a cluster would be a path on the driver's disk."""

    location: str  # where it was read from, for messages
    weights: bytes  # model.pt
    description: dict  # model.json: {"model": constructor arguments, "classes": [...], ...}
    onnx: bytes  # model.onnx (exported from the weights on reading, for a checkpoint from before it was written)

    @property
    def classes(self) -> list[str]:
        return self.description["classes"]


def read(location: str, filesystem: pafs.FileSystem | None = None) -> ModelFiles:
    """The model files of the checkpoint folder at `location`, or of the `checkpoint/` folder of the training
    run's outputs at `location`: a local folder or a URI (s3://, gs://, file://), or a path in `filesystem` (a
    `ray.train.Checkpoint`'s `path` and `filesystem`). A checkpoint without model.onnx (older ones) gets it
    exported here, once."""
    place, shown = _checkpoint_place(location, filesystem)

    def contents(name: str) -> bytes:
        try:
            return place.read_bytes(posixpath.join(place.path, name))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {shown} has no {name}") from None
        except OSError as e:
            raise CheckpointError(f"{shown}/{name} cannot be read ({first_line(e)})") from None

    description = contents(MODEL_CONFIG)
    try:
        meta = json.loads(description)
        meta = {"model": dict(meta["model"]), "classes": [str(c) for c in meta["classes"]], "run": meta.get("run"),
                "mlflow_run_id": meta.get("mlflow_run_id"), "onnx_sha256": meta.get("onnx_sha256")}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{shown}/{MODEL_CONFIG} is not a valid model description ({e})") from None
    weights = contents(WEIGHTS)
    if meta["onnx_sha256"] is None:  # written before checkpoints carried one
        onnx = export_onnx(build(ModelFiles(shown, weights, meta, b""))[0])
        return ModelFiles(shown, weights, meta | {"onnx_sha256": hashlib.sha256(onnx).hexdigest()}, onnx)
    onnx = contents(ONNX)
    if hashlib.sha256(onnx).hexdigest() != meta["onnx_sha256"]:
        raise CheckpointError(f"{shown}/{ONNX} is not the model {MODEL_CONFIG} describes (its SHA-256 differs)")
    return ModelFiles(shown, weights, meta, onnx)


def _checkpoint_place(location: str, filesystem: pafs.FileSystem | None) -> tuple[storage.Place, str]:
    """Where the checkpoint's files are (the folder itself, or a run's outputs' checkpoint/), and how to name it."""
    if filesystem is None:
        try:
            place = storage.Place.of(location)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    else:
        place = storage.Place(filesystem, location, "")
    shown = location if filesystem is None else place.location()
    try:
        kind = place.kind()
    except OSError as e:
        raise CheckpointError(f"checkpoint folder {shown} cannot be reached ({first_line(e)})") from None
    if kind != pafs.FileType.Directory:
        raise CheckpointError(f"checkpoint folder {shown} does not exist")
    run_outputs = storage.Place(place.fs, posixpath.join(place.path, RUN_CHECKPOINT), place.scheme)
    if (not _exists(place, MODEL_CONFIG)) and _exists(run_outputs, MODEL_CONFIG):
        return run_outputs, f"{shown.rstrip('/')}/{RUN_CHECKPOINT}"
    return place, shown


def _exists(place: storage.Place, name: str) -> bool:
    try:
        return place.fs.get_file_info(posixpath.join(place.path, name)).type == pafs.FileType.File
    except OSError:
        return False


def _torch_load(source, name: str, device):
    """`source`: a path, or a file-like object holding the bytes of the file `name` names."""
    import torch

    try:
        # weights_only: a checkpoint can come from anywhere, and a full unpickle runs its code.
        return torch.load(source, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {name}: it holds more than tensors ({first_line(e)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{name} is not a readable torch file ({first_line(e)})") from None


def build(files: ModelFiles, device="cpu") -> tuple[FashionCNN, list[str]]:
    """The torch model in eval mode on `device`, and its class names."""
    from clf.model import FashionCNN

    meta = files.description
    try:
        model = FashionCNN(**meta["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{files.location}/{MODEL_CONFIG} describes no valid model ({e})") from None
    if len(meta["classes"]) != model.config["num_classes"]:
        raise CheckpointError(
            f"checkpoint {files.location} names {len(meta['classes'])} classes for a model of "
            f"{model.config['num_classes']} outputs"
        )
    state = _torch_load(io.BytesIO(files.weights), f"{files.location}/{WEIGHTS}", device)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {files.location} does not fit the model it describes ({first_line(e)})") from None
    return model.to(device).eval(), meta["classes"]


def load_model(location: str | Path, device="cpu") -> tuple[FashionCNN, list[str]]:
    """The model of the checkpoint at `location` (a local folder or a URI) in eval mode on `device`, and its
    class names."""
    return build(read(str(location)), device)


def load_train_state(folder: str | Path, device="cpu") -> dict:
    path = Path(folder) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {TRAIN_STATE}")
    return _torch_load(path, str(path), device)

"""The checkpoint directory and the one way to load a model from it: `read` its files (a local folder or a
URI), `build` the model (resume, evaluation and tagging all do; `load_model` is both).

Layout:
    model.pt        the model's state_dict (tensors only: loaded with weights_only=True)
    model.json      the model's constructor arguments, the class names in class-index order, the run's name
    train_state.pt  optimizer, schedule and epoch, for resuming (not needed for inference)
"""

from __future__ import annotations

import io
import json
import pickle
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch

from clf import storage
from clf.errors import CheckpointError, first_line
from clf.model import FashionCNN

WEIGHTS = "model.pt"
MODEL_CONFIG = "model.json"
TRAIN_STATE = "train_state.pt"
# Where a training run's outputs keep the final model.
RUN_CHECKPOINT = "checkpoint"


def save(folder: str | Path, model: torch.nn.Module, classes, train_state: dict | None = None,
         run: str | None = None, mlflow_run_id: str | None = None) -> None:
    """`run`: the training run's name, which serving's answers name the model by; `mlflow_run_id`: its MLflow
    run, if tracked, which tagging's runs link to."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    torch.save(model.state_dict(), folder / WEIGHTS)
    (folder / MODEL_CONFIG).write_text(
        json.dumps({"model": model.config, "classes": list(classes), "run": run, "mlflow_run_id": mlflow_run_id},
                   indent=2) + "\n"
    )
    if train_state is not None:
        torch.save(train_state, folder / TRAIN_STATE)


@dataclass(frozen=True)
class ModelFiles:
    """What inference needs of a checkpoint, read once (on the driver) and handed to the predictors through
    Ray's object store: no actor opens a path, which on a cluster would be a path on the driver's disk."""

    location: str  # where it was read from, for messages
    weights: bytes  # model.pt
    description: dict  # model.json: {"model": constructor arguments, "classes": [...]}

    @property
    def classes(self) -> list[str]:
        return self.description["classes"]


def read(location: str, filesystem: pafs.FileSystem | None = None) -> ModelFiles:
    """The model files of the checkpoint folder at `location`, or of the `checkpoint/` folder of the training
    run's outputs at `location`: a local folder or a URI (s3://, gs://, file://), or a path in `filesystem` (a
    `ray.train.Checkpoint`'s `path` and `filesystem`)."""
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
        place, shown = run_outputs, f"{shown.rstrip('/')}/{RUN_CHECKPOINT}"

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
                "mlflow_run_id": meta.get("mlflow_run_id")}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{shown}/{MODEL_CONFIG} is not a valid model description ({e})") from None
    return ModelFiles(shown, contents(WEIGHTS), meta)


def _exists(place: storage.Place, name: str) -> bool:
    try:
        return place.fs.get_file_info(posixpath.join(place.path, name)).type == pafs.FileType.File
    except OSError:
        return False


def _torch_load(source, name: str, device: str | torch.device):
    """`source`: a path, or a file-like object holding the bytes of the file `name` names."""
    try:
        # weights_only: a checkpoint can come from anywhere, and a full unpickle runs its code.
        return torch.load(source, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {name}: it holds more than tensors ({first_line(e)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{name} is not a readable torch file ({first_line(e)})") from None


def build(files: ModelFiles, device: str | torch.device = "cpu") -> tuple[FashionCNN, list[str]]:
    """The model in eval mode on `device`, and its class names."""
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


def load_model(location: str | Path, device: str | torch.device = "cpu") -> tuple[FashionCNN, list[str]]:
    """The model of the checkpoint at `location` (a local folder or a URI) in eval mode on `device`, and its
    class names."""
    return build(read(str(location)), device)


def load_train_state(folder: str | Path, device: str | torch.device = "cpu") -> dict:
    path = Path(folder) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {TRAIN_STATE}")
    return _torch_load(path, str(path), device)

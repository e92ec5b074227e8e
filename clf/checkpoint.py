"""The checkpoint directory and the one way to load it (resume, inference and tagging all use `load_model`).

Layout:
    model.pt        the model's state_dict (tensors only: loaded with weights_only=True)
    model.json      the model's constructor arguments and the class names, in class-index order
    train_state.pt  optimizer, schedule and epoch, for resuming (not needed for inference)
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from clf.errors import CheckpointError, first_line
from clf.model import FashionCNN

WEIGHTS = "model.pt"
MODEL_CONFIG = "model.json"
TRAIN_STATE = "train_state.pt"


def save(folder: str | Path, model: torch.nn.Module, classes, train_state: dict | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    torch.save(model.state_dict(), folder / WEIGHTS)
    (folder / MODEL_CONFIG).write_text(
        json.dumps({"model": model.config, "classes": list(classes)}, indent=2) + "\n"
    )
    if train_state is not None:
        torch.save(train_state, folder / TRAIN_STATE)


def _torch_load(path: Path, device: str | torch.device):
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent} has no {path.name}")
    try:
        # weights_only: a checkpoint can come from anywhere, and a full unpickle runs its code.
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {path}: it holds more than tensors ({first_line(e)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable torch file ({first_line(e)})") from None


def read_model_config(folder: str | Path) -> dict:
    path = Path(folder) / MODEL_CONFIG
    if not Path(folder).is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {MODEL_CONFIG}")
    try:
        meta = json.loads(path.read_text())
        return {"model": dict(meta["model"]), "classes": [str(c) for c in meta["classes"]]}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid model description ({e})") from None


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[FashionCNN, list[str]]:
    """The model in eval mode on `device`, and its class names."""
    meta = read_model_config(folder)
    try:
        model = FashionCNN(**meta["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(folder) / MODEL_CONFIG} describes no valid model ({e})") from None
    if len(meta["classes"]) != model.config["num_classes"]:
        raise CheckpointError(
            f"checkpoint {folder} names {len(meta['classes'])} classes for a model of "
            f"{model.config['num_classes']} outputs"
        )
    state = _torch_load(Path(folder) / WEIGHTS, device)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {folder} does not fit the model it describes ({first_line(e)})") from None
    return model.to(device).eval(), meta["classes"]


def load_train_state(folder: str | Path, device: str | torch.device = "cpu") -> dict:
    return _torch_load(Path(folder) / TRAIN_STATE, device)

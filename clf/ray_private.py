"""Ray's private parts that clf leans on, on one list: each is reached from here and nowhere else in `clf/`, and
`PARTS` (from ray_private.toml, beside this module) says what it is, where clf uses it, why, and what replaces it
once Ray offers a public way. Checked against
Ray 2.60 (pinned in pyproject.toml). tests/test_ray_private.py touches every part (its import, attribute,
signature, or the environment variable Ray's module reads) in the fast lane: a Ray upgrade that moves one fails
there in seconds, naming it, rather than at a user's first fit(). The pin is what keeps them; the test is what
makes moving it safe.
"""

from __future__ import annotations

import importlib
import inspect
import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Part:
    name: str  # what it is, in a few words
    module: str  # the Ray module that holds it
    attribute: str  # its dotted path in that module; for an environment variable, the variable's name
    kind: str  # "attribute", "callable" (with `parameters`), "class", or "env" (a variable Ray reads from os.environ)
    used_by: str  # where clf uses it
    why: str
    replacement: str  # what would replace it
    parameters: tuple[str, ...] = ()  # a callable's parameters clf passes or overrides


def _parts() -> tuple[Part, ...]:
    listed = tomllib.loads((Path(__file__).with_name("ray_private.toml")).read_text())["part"]
    return tuple(Part(**(entry | {"parameters": tuple(entry.get("parameters", ()))})) for entry in listed)


PARTS = _parts()


def touch(part: Part) -> None:
    """Look the part up in Ray as clf uses it; AssertionError (naming it) where it is not there or not as used."""
    where = f"{part.name} ({part.module}.{part.attribute})"
    try:
        module = importlib.import_module(part.module)
    except ImportError as e:
        raise AssertionError(f"{where}: its module is gone ({e})") from None
    if part.kind == "env":
        assert f'"{part.attribute}"' in inspect.getsource(module), f"{where}: Ray no longer reads this variable there"
        return
    value = module
    for name in part.attribute.split("."):
        assert hasattr(value, name), f"{where}: no {name}"
        value = getattr(value, name)
    if part.kind == "class":
        assert inspect.isclass(value), f"{where}: not a class"
    if part.kind == "callable":
        assert callable(value), f"{where}: not callable"
        parameters = set(inspect.signature(value).parameters)
        assert set(part.parameters) <= parameters, f"{where}: its parameters are {sorted(parameters)}"


# --- The accessors: clf reaches each part through these ---------------------------------------------------------


def single_machine_mode() -> None:
    import ray._private.ray_constants

    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


def logs_dir() -> str:
    import ray._private.worker

    return ray._private.worker._global_node.get_logs_dir_path()


def divert_published_errors(write) -> None:
    """Ray's driver-side printer of the cluster's published errors replaced by `write(data, ignore_prefix)`."""
    import ray._private.worker

    ray._private.worker.print_to_stdstream = write


def free_resources_per_node() -> dict[str, dict[str, float]]:
    import ray._private.state

    return ray._private.state.available_resources_per_node()


def autoscaler_config():
    import ray._private.state

    return ray._private.state.state.get_cluster_config()


def actors_pending_creation() -> dict:
    import ray._private.state

    return ray._private.state.actors(actor_state_name="PENDING_CREATION")


def kv_put(key: bytes, value: bytes, namespace: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=namespace)


def kv_get(key: bytes, namespace: str) -> bytes | None:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key, namespace=namespace)


def kv_delete(key: bytes, namespace: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, namespace=namespace)


def kv_keys(prefix: str, namespace: str) -> list[bytes]:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_list(prefix, namespace=namespace)


def placement_group(id_hex: str):
    import ray
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(ray.PlacementGroupID(bytes.fromhex(id_hex)))


def train_callbacks():
    """(DatasetsCallback, PlacementGroupCleanerCallback, WorkerGroupCallback) of Ray Train."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    return DatasetsCallback, PlacementGroupCleanerCallback, WorkerGroupCallback


def worker_group_placement_group(worker_group):
    return worker_group.get_worker_group_state().placement_group_handle.placement_group


def ray_train_error() -> type:
    from ray.train.v2._internal.exceptions import RayTrainError

    return RayTrainError


def is_startup_timeout(failure: BaseException) -> bool:
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return isinstance(failure, WorkerGroupStartupTimeoutError)


def serve_client():
    from ray.serve.context import _get_global_client

    return _get_global_client()

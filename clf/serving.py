"""Tagging online: the trained model behind HTTP with Ray Serve, from the same checkpoint forms as `jobs/tag.py`,
with the same photo conversion (`clf.photos`), predictor (`clf.predictor.Predictor`) and rows
(`clf.tagging.rows.tag_columns`): a photo's answer is its row of tags.parquet.

    POST /tag      one photo as the body -> its row, and `model`
                   several photos as multipart/form-data (any field names) -> their rows, in the order sent
    GET /classes   the model's classes
    GET /healthz   200 once the model is loaded (never asks for the token), and which replica answered

The application is deployed from a Serve config (declaratively, as `serve deploy` and KubeRay do; the only way
Ray 2.60 updates running replicas in place). A replica's settings come in two parts. Its start-up settings (the
token's digest, the body limit, its CPUs and GPU) are the builder's `args`, read by the job that deploys (never
from a replica's environment, which a cluster's raylets do not hand on); a change makes a new application version,
whose replicas replace the running ones. What may change while it serves (the checkpoint, the review threshold,
the batch settings) is the deployment's `user_config`, which reaches the running replicas through
`reconfigure()`: a new checkpoint is loaded by the same replicas, beside the old model, and swapped in at once
(docs/serving.md).

`build` is the application builder a Serve config names (import_path clf.serving:build): `jobs/serve.py`, a
`serve deploy` config and KubeRay's RayService (k8s/rayservice.yaml) all make the application through it.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations (Request), and Serve's
# class-based views rewrap the methods where string annotations no longer resolve.
import asyncio
import dataclasses
import hashlib
import json
import os
import posixpath
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from clf.config import ServeConfig
from clf.predictor import Predictor
from clf.tagging.rows import COLUMNS, tag_columns

APP_NAME = "clf"
DEPLOYMENT = "Tagger"
IMPORT_PATH = "clf.serving:build"
TOKEN_ENV = "CLF_SERVE_TOKEN"

# What reaches running replicas through reconfigure() (the deployment's user_config), and how they scale (its
# autoscaling_config, applied by Serve's controller): neither restarts a replica.
USER_CONFIG = ("checkpoint", "review_threshold", "max_batch_size", "batch_wait_ms")
SCALING = ("min_replicas", "max_replicas", "target_ongoing_requests")
# A multipart request: at most this many photos, and this many times --max-photo-mb in all.
MAX_PHOTOS_PER_REQUEST = 256
REQUEST_PHOTOS_OF_BYTES = 16

# HTTP status for each reason a photo is refused (the reasons are `clf.photos`'s, as in tags.parquet's rows).
REFUSED = {"empty": 400, "not an image": 415, "image too large": 413}
UNPROCESSABLE = 422  # truncated or corrupt, no item found, dark background: a photo the conversion refuses


@dataclass(frozen=True)
class Model:
    """One loaded model: its predictor, its classes, and its name as answers give it (the run's name and a digest
    of the weights). A batch takes one Model once; swapping in another never mixes the two."""

    predictor: Predictor
    classes: list[str]
    name: str
    review_threshold: float


class Refused(Exception):
    """A request answered with `status` and {"error": reason}."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, counted as it is read (a declared Content-Length or not, chunked or not): Refused (413)
    past `limit` bytes."""
    return b"".join([chunk async for chunk in bounded(request, limit, what)])


async def bounded(request: Request, limit: int, what: str):
    """The body's chunks as they arrive; Refused (413, `what`) as soon as more than `limit` bytes came or were
    declared."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"{what} ({int(declared) / 2**20:.1f} MB; at most {limit / 2**20:g} MB)")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"{what} (over {limit / 2**20:g} MB)")
        yield chunk


def model_name(files) -> str:
    """"RUN@DIGEST": the training run's name (from the checkpoint, else the folder it came from) and the first
    12 hex digits of the weights' SHA-256."""
    run = files.description.get("run") or _run_folder(files.location)
    return f"{run}@{hashlib.sha256(files.weights).hexdigest()[:12]}"


def _run_folder(location: str) -> str:
    path = location.rstrip("/")
    if posixpath.basename(path) == "checkpoint":
        path = posixpath.dirname(path)
    return posixpath.basename(path) or "model"


def _frame(columns: dict):
    import pandas as pd

    return pd.DataFrame(columns)


def _records(frame) -> list[dict]:
    """Rows as JSON-ready dicts in the tags file's column order: missing values as None, numpy scalars as
    Python's, probabilities to 6 decimals."""
    return json.loads(frame[[c for c in COLUMNS if c in frame.columns]].to_json(orient="records", double_precision=6))


def _error_row(error: str, model: Model) -> dict:
    columns = tag_columns(np.zeros((1, 3), np.int64), np.zeros((1, 3), np.float32), np.array([error]), model.classes,
                          model.review_threshold)
    return _records(_frame(columns))[0] | {"model": model.name}


# --- The deployment: a replica's routes ---------------------------------------------------------------------

# Serve pickles the class with its routes as it is decorated: whatever its methods use is defined above it.
api = FastAPI(title="clf", docs_url=None, redoc_url=None)


@api.exception_handler(Refused)
async def _refused(request: Request, error: Refused) -> JSONResponse:
    return JSONResponse({"error": error.reason}, status_code=error.status)


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class Tagger:
    def __init__(self, settings: dict):
        """`settings`: the start-up settings (`startup_settings`); the model comes with reconfigure()."""
        self.token_sha256 = settings["token_sha256"]
        self.max_photo_bytes = settings["max_photo_bytes"]
        self.use_gpu = settings["use_gpu"]
        self.cpus = settings["cpus"]
        # Decoding: a thread per CPU this replica holds (Pillow's decoders and most of the conversion's numpy
        # release the GIL); the model's forward pass as many (ONNX Runtime's threads), between batches.
        self.decoders = ThreadPoolExecutor(self.cpus, thread_name_prefix="decode")
        self.model: Model | None = None
        self.batch_sizes: list[int] = []  # the last batches' sizes, for GET /stats

    def reconfigure(self, config: dict) -> None:
        """Load the checkpoint `config` names (unless it is the one served), then swap it in at once."""
        from clf import checkpoint as ckpt

        files = ckpt.read(config["checkpoint"])
        name = model_name(files)
        served = self.model
        predictor = (served.predictor if served is not None and served.name == name
                     else Predictor(files, use_gpu=self.use_gpu, num_threads=self.cpus, top_k=3))
        self.tag_images.set_max_batch_size(config["max_batch_size"])
        self.tag_images.set_batch_wait_timeout_s(config["batch_wait_ms"] / 1000)
        self.model = Model(predictor, files.classes, name, config["review_threshold"])

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("no model: the application's config gives no checkpoint (user_config.checkpoint)")

    def authorize(self, request: Request) -> None:
        """Refused (401) unless the request carries the token, where there is one."""
        if self.token_sha256 is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not secrets.compare_digest(hashlib.sha256(given.encode()).hexdigest(), self.token_sha256):
            raise Refused(401, "this server asks for a token: Authorization: Bearer TOKEN")

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "model": self.model.name, "replica": serve.get_replica_context().replica_id.unique_id}

    @api.get("/classes")
    async def classes(self, request: Request):
        self.authorize(request)
        return {"classes": self.model.classes, "model": self.model.name}

    @api.get("/stats")
    async def stats(self, request: Request):
        self.authorize(request)
        return {"model": self.model.name, "batch_sizes": self.batch_sizes}

    @api.post("/tag")
    async def tag(self, request: Request):
        self.authorize(request)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            bodies = await self.photos_of_form(request)
            return await asyncio.gather(*(self.answer(body) for body in bodies))
        image, error = await self.convert(await read_body(request, self.max_photo_bytes, "image too large"))
        if image is None:
            raise Refused(next((code for start, code in REFUSED.items() if error.startswith(start)), UNPROCESSABLE),
                          error)
        return await self.tag_images(image)

    async def photos_of_form(self, request: Request) -> list[bytes]:
        """The files of a multipart form, in the order sent, its body counted as it is read."""
        stream = bounded(request, self.max_photo_bytes * REQUEST_PHOTOS_OF_BYTES, "request too large")
        parser = MultiPartParser(request.headers, stream, max_files=MAX_PHOTOS_PER_REQUEST,
                                 max_part_size=self.max_photo_bytes + 1)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise Refused(400, f"not a readable multipart form ({e.message})") from None
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise Refused(400, "a multipart request with no file in it")
        return [await f.read() for f in files]

    async def convert(self, data: bytes) -> tuple[np.ndarray | None, str]:
        """The photo's 28x28 image, or "" and why not (the reasons of clf.photos, as in tags.parquet)."""
        from clf import photos

        if len(data) > self.max_photo_bytes:
            return None, f"image too large ({len(data) / 2**20:.1f} MB; at most {self.max_photo_bytes / 2**20:g} MB)"
        try:
            return await asyncio.get_running_loop().run_in_executor(self.decoders, photos.load, data), ""
        except photos.PhotoError as e:
            return None, str(e)

    async def answer(self, data: bytes) -> dict:
        """A photo's row of tags; an unreadable one's row says why (its error), as tagging writes it."""
        image, error = await self.convert(data)
        if image is not None:
            return await self.tag_images(image)
        return _error_row(error, self.model)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def tag_images(self, images: list[np.ndarray]) -> list[dict]:
        """One forward pass for the photos that arrived together; each answer with the model's name."""
        model = self.model  # one model for the whole batch, whatever a reconfigure swaps in meanwhile
        self.batch_sizes = (self.batch_sizes + [len(images)])[-1000:]
        out = model.predictor({"image": np.stack(images)})
        frame = _frame(tag_columns(out["top_classes"], out["top_probs"], np.full(len(images), ""), model.classes,
                                   model.review_threshold))
        return [row | {"model": model.name} for row in _records(frame)]


# --- The application: what a deploy sends ---------------------------------------------------------------------


def token_digest(cfg: ServeConfig) -> str | None:
    """The SHA-256 of the token the replicas ask for: --token, else CLF_SERVE_TOKEN in the environment of the
    process that builds the application's config (the deploying job; a RayService's build task, on a pod its
    Secret reaches), else none. Replicas keep the digest alone, and so does the application's config."""
    token = cfg.token or os.environ.get(TOKEN_ENV) or None
    return None if token is None else hashlib.sha256(token.encode()).hexdigest()


def startup_settings(cfg: ServeConfig, digest: str | None) -> dict:
    """A replica's constructor arguments: what it reads once, when it starts."""
    return {"token_sha256": digest, "max_photo_bytes": int(cfg.max_photo_mb * 2**20), "use_gpu": cfg.use_gpu,
            "cpus": cfg.cpus_per_replica}


def code_version() -> str:
    """A digest of clf's source: the code the replicas run."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def deployment_entry(cfg: ServeConfig) -> dict:
    """The deployment's entry of a Serve config: what Serve applies to running replicas (the user_config, through
    reconfigure(); the autoscaling bounds and requests per replica, in its controller). Each replica takes at least
    two batches' worth of requests at once, or batches could never fill (Serve's default of 5 is below its default
    batch of 10)."""
    return {
        "name": DEPLOYMENT,
        "user_config": {name: getattr(cfg, name) for name in USER_CONFIG},
        "autoscaling_config": {name: getattr(cfg, name) for name in SCALING},
        "max_ongoing_requests": max(2 * cfg.max_batch_size, int(cfg.target_ongoing_requests) + 1),
    }


# The builder's `args` that are not ServeConfig's fields: the token's digest, and the code's (jobs/serve.py sets
# both: new code or another token makes another application version, whose replicas replace the running ones).
EXTRA_ARGS = ("token_sha256", "code")


def build(args: dict):
    """Serve's application builder, run where Serve builds the application: `args` are jobs/serve.py's start-up
    settings (ServeConfig's fields but those of the deployment's entry, which may be given here too), checked as
    the command line checks them, and EXTRA_ARGS."""
    settings = {k: v for k, v in args.items() if k not in EXTRA_ARGS}
    cfg = ServeConfig(**({"checkpoint": "(the deployment's user_config)"} | settings))
    digest = args["token_sha256"] if "token_sha256" in args else token_digest(cfg)
    options = {"ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": 1 if cfg.use_gpu else 0}}
    if "checkpoint" in settings:  # a config that names the model in args (a change then replaces the replicas)
        options |= {k: v for k, v in deployment_entry(cfg).items() if k != "name"}
    return Tagger.options(**options).bind(startup_settings(cfg, digest))


def application(cfg: ServeConfig, runtime_env: dict | None = None, deploying: bool = False) -> dict:
    """The application's entry of a Serve config (`serve deploy`, KubeRay's serveConfigV2): the builder's `args`
    hold the start-up settings, whose change rebuilds the application and replaces its replicas one by one; the
    deployment's entry holds what changes in place (`deployment_entry`). `deploying`: the config jobs/serve.py
    applies, whose args also carry the token's digest and the code's; never the token itself."""
    args = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in (*USER_CONFIG, *SCALING, "ray_logs", "dashboard", "host", "port", "proxy", "token")}
    if deploying:
        args |= {"token_sha256": token_digest(cfg), "code": code_version()}
    return {"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "runtime_env": runtime_env or {},
            "args": args, "deployments": [deployment_entry(cfg)]}


def serve_config(cfg: ServeConfig) -> dict:
    """A Serve config for `serve deploy` and KubeRay's serveConfigV2 (the token comes from CLF_SERVE_TOKEN where
    Serve builds the application, never from a config)."""
    return {"proxy_location": "EveryNode", "http_options": {"host": cfg.host, "port": cfg.port},
            "applications": [application(dataclasses.replace(cfg, token=None))]}

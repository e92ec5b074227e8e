"""Tagging online: the trained model behind HTTP with Ray Serve, on the same cluster and from the same checkpoint
forms as `jobs/tag.py`, with the same photo conversion (`clf.photos`), predictor (`clf.infer.Predictor`) and
rows (`clf.tagging.pipeline.tag_columns`): a photo's answer is its row of tags.parquet.

    POST /tag      one photo as the body -> its row, and `model`
                   several photos as multipart/form-data (any field names) -> their rows, in the order sent
    GET /classes   the model's classes
    GET /healthz   200 once the model is loaded (never asks for the token)

A replica decodes each photo in a thread of its own pool (Pillow's decoders and most of the conversion's numpy
work release the GIL, so photos decode side by side on the replica's CPUs rather than one after another in its
event loop), then hands the 28x28 image to a batch (`@serve.batch`): the photos that arrive together share one
forward pass. What the checkpoint holds reaches a replica through `reconfigure` (Serve's user_config): a new
checkpoint deployed while requests stream is loaded beside the old model and swapped in at once, so an answer
comes from one model, named in it, and no request fails.

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

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from clf.config import ServeConfig

APP_NAME = "clf"
DEPLOYMENT = "Tagger"
IMPORT_PATH = "clf.serving:build"
TOKEN_ENV = "CLF_SERVE_TOKEN"

# What a reconfigure may change without a restart (the rest is the replica's start-up settings).
USER_CONFIG = ("checkpoint", "review_threshold", "max_batch_size", "batch_wait_ms")

# HTTP status for each reason a photo is refused (the reasons are `clf.photos`'s, as in tags.parquet's rows).
REFUSED = {"empty": 400, "not an image": 415, "image too large": 413}
UNPROCESSABLE = 422  # truncated or corrupt, no item found, dark background: a photo the conversion refuses


@dataclass(frozen=True)
class Model:
    """One loaded model: its predictor, its classes, and its name as answers give it (the run's name and a digest
    of the weights). A batch takes one Model once; swapping in another never mixes the two."""

    predictor: object  # clf.infer.Predictor
    classes: list[str]
    name: str
    review_threshold: float


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


def user_config(cfg: ServeConfig) -> dict:
    return {name: getattr(cfg, name) for name in USER_CONFIG}


def deployment_options(cfg: ServeConfig) -> dict:
    """Replicas, their resources, and how many requests each takes at once: at least two batches' worth, or
    batches could never fill (Serve's default of 5 is below its default batch of 10)."""
    return {
        "autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                               "target_ongoing_requests": cfg.target_ongoing_requests},
        "max_ongoing_requests": max(2 * cfg.max_batch_size, int(cfg.target_ongoing_requests) + 1),
        "ray_actor_options": {"num_cpus": 0 if cfg.use_gpu else 1, "num_gpus": 1 if cfg.use_gpu else 0},
        "user_config": user_config(cfg),
    }


def build(args: dict):
    """Serve's application builder: `args` are jobs/serve.py's settings (ServeConfig's fields), checked as the
    command line checks them."""
    from ray import serve

    cfg = ServeConfig(**args)
    settings = {"token": cfg.token, "max_photo_bytes": int(cfg.max_photo_mb * 2**20), "use_gpu": cfg.use_gpu}
    return serve.deployment(name=DEPLOYMENT)(_tagger_class()).options(**deployment_options(cfg)).bind(settings)


_TAGGER = None


def _tagger_class():
    """The deployment's class, made on first use (Serve is imported only where it is served)."""
    global _TAGGER
    if _TAGGER is not None:
        return _TAGGER
    from ray import serve

    api = FastAPI(title="clf", docs_url=None, redoc_url=None)

    def refused(status: int, reason: str) -> JSONResponse:
        return JSONResponse({"error": reason}, status_code=status)

    @serve.ingress(api)
    class Tagger:
        def __init__(self, settings: dict):
            from clf import runtime

            self.token = settings["token"] or os.environ.get(TOKEN_ENV) or None
            self.max_photo_bytes = settings["max_photo_bytes"]
            self.use_gpu = settings["use_gpu"]
            cpus = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
            self.decoders = ThreadPoolExecutor(cpus, thread_name_prefix="decode")
            runtime.use_cpus(1)  # the forward pass: one thread; the others decode
            self.model: Model | None = None
            self.batch_sizes: list[int] = []  # the last batches' sizes, for GET /stats

        def reconfigure(self, config: dict) -> None:
            """Load the checkpoint `config` names (if it is not the one served), then swap it in at once."""
            from clf import checkpoint as ckpt
            from clf.infer import Predictor

            files = ckpt.read(config["checkpoint"])
            name = model_name(files)
            predictor = (self.model.predictor if self.model is not None and self.model.name == name
                         else Predictor(files, use_gpu=self.use_gpu, top_k=3))
            self.tag_images.set_max_batch_size(config["max_batch_size"])
            self.tag_images.set_batch_wait_timeout_s(config["batch_wait_ms"] / 1000)
            self.model = Model(predictor, files.classes, name, config["review_threshold"])

        def _allowed(self, request: Request) -> bool:
            if self.token is None:
                return True
            given = request.headers.get("authorization", "")
            return secrets.compare_digest(given.encode(), f"Bearer {self.token}".encode())

        async def _convert(self, data: bytes) -> tuple[np.ndarray | None, str]:
            """The photo's 28x28 image, or "" and why not (the reasons of clf.photos, as in tags.parquet)."""
            from clf import photos

            if len(data) > self.max_photo_bytes:
                return None, f"image too large ({len(data) / 2**20:.1f} MB; at most {self.max_photo_bytes / 2**20:g} MB)"
            try:
                return await asyncio.get_running_loop().run_in_executor(self.decoders, photos.load, data), ""
            except photos.PhotoError as e:
                return None, str(e)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def tag_images(self, images: list[np.ndarray]) -> list[dict]:
            """One forward pass for the photos that arrived together; each answer with the model's name."""
            from clf.tagging.pipeline import tag_columns

            model = self.model  # one model for the whole batch, whatever a reconfigure swaps in meanwhile
            self.batch_sizes = (self.batch_sizes + [len(images)])[-1000:]
            out = model.predictor({"image": np.stack(images)})
            frame = _frame(tag_columns(out["top_classes"], out["top_probs"], np.full(len(images), ""), model.classes,
                                       model.review_threshold))
            return [row | {"model": model.name} for row in _records(frame)]

        async def _answer(self, data: bytes) -> dict:
            """A photo's row of tags; an unreadable one's row says why (its error), as tagging writes it."""
            image, error = await self._convert(data)
            if image is not None:
                return await self.tag_images(image)
            return _error_row(error, self.model)

        @api.get("/healthz")
        async def healthz(self):
            return {"status": "ok", "model": self.model.name}

        @api.get("/classes")
        async def classes(self, request: Request):
            if not self._allowed(request):
                return refused(401, "this server asks for a token: Authorization: Bearer TOKEN")
            return {"classes": self.model.classes, "model": self.model.name}

        @api.get("/stats")
        async def stats(self, request: Request):
            if not self._allowed(request):
                return refused(401, "this server asks for a token: Authorization: Bearer TOKEN")
            return {"model": self.model.name, "batch_sizes": self.batch_sizes}

        @api.post("/tag")
        async def tag(self, request: Request):
            if not self._allowed(request):
                return refused(401, "this server asks for a token: Authorization: Bearer TOKEN")
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.max_photo_bytes * 16:
                return refused(413, f"request too large ({int(declared) / 2**20:.1f} MB)")
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                try:
                    form = await request.form(max_files=256, max_part_size=self.max_photo_bytes + 1)
                except Exception as e:  # noqa: BLE001 - Starlette's parser errors: a malformed form is the client's
                    return refused(400, f"not a readable multipart form ({e})")
                files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
                if not files:
                    return refused(400, "a multipart request with no file in it")
                bodies = [await f.read() for f in files]
                return await asyncio.gather(*(self._answer(body) for body in bodies))
            body = await request.body()
            image, error = await self._convert(body)
            if image is None:
                status = next((code for start, code in REFUSED.items() if error.startswith(start)), UNPROCESSABLE)
                return refused(status, error)
            return await self.tag_images(image)

    _TAGGER = Tagger
    return _TAGGER


def _frame(columns: dict):
    import pandas as pd

    return pd.DataFrame(columns)


def _records(frame) -> list[dict]:
    """Rows as JSON-ready dicts in the tags file's column order: missing values as None, numpy scalars as
    Python's, probabilities to 6 decimals."""
    from clf.tagging.pipeline import COLUMNS

    return json.loads(frame[[c for c in COLUMNS if c in frame.columns]].to_json(orient="records", double_precision=6))


def _error_row(error: str, model: Model) -> dict:
    from clf.tagging.pipeline import tag_columns

    columns = tag_columns(np.zeros((1, 3), np.int64), np.zeros((1, 3), np.float32), np.array([error]), model.classes,
                          model.review_threshold)
    return _records(_frame(columns))[0] | {"model": model.name}


def serve_config(cfg: ServeConfig) -> dict:
    """A Serve config (for `serve deploy`, and KubeRay's serveConfigV2) that builds this application with
    these settings; a token goes to the replicas through CLF_SERVE_TOKEN, never into a config."""
    args = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in ("ray_logs", "dashboard", "host", "port", "proxy", "token")}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args}],
    }


# --- jobs/serve.py: start the application (an embedded Ray), or deploy it to a cluster ------------------------

# Seconds to wait for the application to answer GET /healthz once deployed.
READY_TIMEOUT_S = 300


def run(cfg: ServeConfig, announce=print) -> str:
    """Deploy the application with `cfg` (or redeploy it: a changed checkpoint or batch setting reaches the
    running replicas through `reconfigure`, without a restart), wait until it answers, then:

    - on an embedded Ray (no RAY_ADDRESS), serve until Ctrl-C, then stop everything of it;
    - on a cluster (RAY_ADDRESS), leave it running there and return.

    Returns the job's last line."""
    from clf import checkpoint as ckpt
    from clf import runtime

    files = ckpt.read(cfg.checkpoint)  # here first: a checkpoint that cannot be loaded is one line, before Ray
    ckpt.build(files)
    url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
    embedded = runtime.embedded()
    if embedded:
        _check_port_free(cfg.host, cfg.port)
    runtime.serve_env(cfg.proxy)
    runtime.connect(cfg.ray_logs, cfg.dashboard)
    from ray import serve

    runtime.quiet_ray_serve(cfg.ray_logs)
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=runtime.serve_logging(cfg.ray_logs))
    serve.run(build(dataclasses.asdict(cfg)), name=APP_NAME, route_prefix="/",
              logging_config=runtime.serve_logging(cfg.ray_logs))
    served = _wait_until_answering(url, model_name(files))
    announce(f"serving on {url} (model {served})")
    if not embedded:
        return f"deployed to the cluster at {os.environ['RAY_ADDRESS']}; it keeps serving after this job"
    try:
        runtime.wait_for_ctrl_c()
    except KeyboardInterrupt:
        pass
    # No serve.shutdown(): the embedded Ray goes as the job exits (runtime.exit_now), Serve with it; and a Ctrl-C
    # on a terminal reaches Ray's own processes too, which a graceful shutdown would wait on for 30 s.
    return "stopped"


def _check_port_free(host: str, port: int) -> None:
    import socket

    from clf.errors import ConfigError

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a closed port's TIME_WAIT is no user
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port} cannot be listened on ({e.strerror or e})") from None


def _wait_until_answering(url: str, name: str, timeout_s: float = READY_TIMEOUT_S) -> str:
    """Until GET /healthz answers with the model `name` (a redeploy: until every replica asked serves it);
    the model's name. ClfError if it never does."""
    import time
    import urllib.error
    import urllib.request

    from clf.errors import ClfError

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
                served = json.loads(answer.read())["model"]
                if served == name:
                    return served
                last = f"it serves {served}"
        except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
            last = str(e)
        time.sleep(0.5)
    raise ClfError(f"the application did not answer at {url}/healthz with model {name} in {timeout_s:.0f} s ({last})")

"""The serving baseline: the same photo conversion, predictor and engine as `jobs/serve.py` (clf.photos,
clf.predictor.Predictor on ONNX Runtime, the tags' columns), in one uvicorn + FastAPI process, without Ray and
without batching: a photo per forward pass, converted in the request's handler.

    python benchmarks/plain_server.py --checkpoint runs/NAME/checkpoint [--port 8123]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from clf import checkpoint, photos  # noqa: E402
from clf.predictor import Predictor  # noqa: E402
from clf.serving import _frame, _records  # noqa: E402
from clf.tagging.rows import tag_columns  # noqa: E402


def app_for(location: str) -> FastAPI:
    files = checkpoint.read(location)
    predictor = Predictor(files, top_k=3)
    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/tag")
    async def tag(request: Request):
        try:
            image = photos.load(await request.body())
        except photos.PhotoError as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        out = predictor({"image": image[None]})
        columns = tag_columns(out["top_classes"], out["top_probs"], np.array([""]), files.classes, 0.6)
        return _records(_frame(columns))[0]

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--port", type=int, default=8123)
    args = p.parse_args()
    uvicorn.run(app_for(args.checkpoint), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

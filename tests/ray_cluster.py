"""A real Ray cluster on loopback for tests: started with `ray start`, stopped by its own processes only.

Every node has a --temp-dir of its own, and every process of the cluster has one of them in its command
line or descends from one that has; stopping kills exactly those, never `ray stop` (which ends every Ray
on the machine).
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from clf.session import LOOPBACK_ENV

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_survivors(procs: list[psutil.Process], grace_s: float) -> None:
    """Give `procs` `grace_s` seconds to end, then SIGKILL those still alive and wait for them."""
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def not_shared(basetemp: Path) -> tuple[Path, ...]:
    """What a second node must not share with the driver for it to stand for another host: the tests' own
    folder (outputs, local checkpoints, data and photos the tests write) and Ray Train's default storage."""
    return basetemp, Path.home() / "ray_results"


class LocalCluster:
    def __init__(self, num_cpus: int = 2):
        # Short, private temp dir: Ray's unix socket paths must stay under ~100 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="clf-ray-", dir="/tmp")
        self.worker_temp_dirs: list[str] = []
        self._node_helpers: list[subprocess.Popen] = []
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = {
            **os.environ,
            # Token auth as on a real cluster: the same token for the nodes and for `ray job submit`.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            **LOOPBACK_ENV,
            # The job's `python` is the one running the tests, with its packages.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.num_cpus = num_cpus

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def session_dir(self) -> Path:
        return Path(self.temp_dir) / "session_latest"

    def start(self) -> LocalCluster:
        cmd = [
            RAY, "start", "--head",
            "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1",
            "--port", str(self.gcs_port),
            "--dashboard-port", str(self.dashboard_port),
            "--dashboard-agent-listen-port", str(free_port()),
            "--ray-client-server-port", str(free_port()),
            "--num-cpus", str(self.num_cpus),
            "--temp-dir", self.temp_dir,
            "--disable-usage-stats",
        ]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{proc.stdout}\n{proc.stderr}")
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def add_worker_node(self, num_cpus: int = 1, private: tuple[Path, ...] = ()) -> str:
        """Start one more node on loopback with a --temp-dir of its own, joined to the head; returns that
        temp dir. (`tests/ray_node.py` says why not `ray start`.)

        `private`: folders this node must not share with the machine, as two hosts of a real cluster share
        no disk. The node then runs in a mount namespace of its own (`unshare`, which needs root) with an
        empty tmpfs over each of them: it sees none of what the driver writes there (outputs, local
        checkpoints, photos), and what it writes there stays its own. Everything else (the network on
        loopback, the installed packages, /dev/shm) it shares."""
        temp_dir = tempfile.mkdtemp(prefix="clf-ray-w-", dir="/tmp")
        self.worker_temp_dirs.append(temp_dir)
        command = [sys.executable, str(Path(__file__).with_name("ray_node.py")), "--address", self.address,
                   "--temp-dir", temp_dir, "--num-cpus", str(num_cpus)]
        if private:
            mounts = "".join(f"mkdir -p {shlex.quote(str(p))} && mount -t tmpfs clf-private {shlex.quote(str(p))} && "
                             for p in private)
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts}exec "$@"', "sh",
                       *command]
        errors = Path(temp_dir) / "node-stderr.log"
        with errors.open("w") as stderr:
            node = subprocess.Popen(command, env=self.env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self._node_helpers.append(node)
        line = node.stdout.readline()  # "node ID up", or "" if it died
        if " up" not in line:
            code = node.wait(timeout=30)
            why = errors.read_text()[-2000:]
            if private:
                raise RuntimeError(
                    f"could not start a Ray node with a disk of its own (unshare --mount, then tmpfs mounts over "
                    f"{', '.join(map(str, private))}; this needs root or CAP_SYS_ADMIN): exit {code}\n{why}"
                )
            raise RuntimeError(f"the worker node did not start (exit {code})\n{why}")
        return temp_dir

    def raylet(self, temp_dir: str) -> psutil.Process:
        """The raylet of the node with this temp dir."""
        for p in self.processes([temp_dir]):
            if p.name() == "raylet":
                return p
        raise RuntimeError(f"no raylet for the node in {temp_dir}")

    def processes(self, temp_dirs: list[str] | None = None) -> list[psutil.Process]:
        """The processes of the nodes with these temp dirs (default: the whole cluster), with descendants."""
        temp_dirs = temp_dirs if temp_dirs is not None else [self.temp_dir, *self.worker_temp_dirs]
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                args = p.info["cmdline"] or []
                # The head's client server names only the GCS address, not the temp dir.
                if any(any(d in a for d in temp_dirs) for a in args) or (
                    self.temp_dir in temp_dirs and any(a.endswith(f"127.0.0.1:{self.gcs_port}") for a in args)
                ):
                    roots.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found = {p.pid: p for p in roots}
        for root in roots:
            try:
                found.update({c.pid: c for c in root.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        kill_survivors(procs, grace_s=10)
        for helper in self._node_helpers:
            helper.wait(timeout=10)
            helper.stdout.close()
        for temp_dir in (self.temp_dir, *self.worker_temp_dirs):
            shutil.rmtree(temp_dir, ignore_errors=True)

    def submit(self, *entrypoint: str, working_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        cmd = [RAY, "job", "submit", "--address", self.dashboard_url, "--working-dir", str(working_dir), "--", *entrypoint]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=working_dir)


"""Serving under load: requests/s and latency of `jobs/serve.py` (Ray Serve, with its Python proxy and with
HAProxy) against a plain server (the same conversion, predictor and engine, ONNX Runtime, in one uvicorn +
FastAPI process, without Ray or batching), all on 127.0.0.1, in one invocation. Figures, not pass/fail.

    .venv/bin/python benchmarks/serve.py [--clients 1 8 32] [--seconds 15] [--photos 64]

Each server is started, warmed up, then loaded by N clients (one keep-alive connection each, a photo per
request, the next as soon as the answer is in) for T seconds at each N, then stopped. The photos are Fashion-MNIST
test images rendered as store photos (about 1000 px JPEGs, as benchmarks/ingest.py makes them). The client is
an asyncio loop in this process: it takes CPU from the same 2 cores, alike for every server. Also measured: the
conversion's photos/s in one process with 1 thread and with a thread per CPU (what a replica's decoding pool
gets out of its threads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import cpu_model  # noqa: E402

PY = sys.executable


async def one_client(port: int, bodies: list[bytes], until: float, start: int, latencies: list, failures: list):
    """Requests one after another on one keep-alive connection until `until`; a connection the server closes
    is a failed request, and the client connects again."""
    i, connection = start, None
    while time.perf_counter() < until:
        if connection is None:
            connection = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = connection
        body = bodies[i % len(bodies)]
        i += 1
        sent = time.perf_counter()
        try:
            writer.write(b"POST /tag HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionResetError("closed by the server")
            status, length = int(status_line.split()[1]), 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
        except (ConnectionError, asyncio.IncompleteReadError):
            failures.append("closed")
            writer.close()
            connection = None
            continue
        latencies.append(time.perf_counter() - sent)
        if status != 200:
            failures.append(status)
    if connection is not None:
        connection[1].close()


def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict:
    latencies, failures = [], []

    async def main():
        until = time.perf_counter() + seconds
        await asyncio.gather(*(one_client(port, bodies, until, c * 7, latencies, failures) for c in range(clients)))

    started = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"clients": clients, "requests_per_s": (len(latencies) - len(failures)) / elapsed, "failed": len(failures),
            "p50_ms": 1000 * ordered[len(ordered) // 2], "p99_ms": 1000 * ordered[int(len(ordered) * 0.99)]}


class Server:
    """A server process on 127.0.0.1:port, up once `ready` answers; stopped with Ctrl-C."""

    def __init__(self, command: list[str], port: int, env: dict):
        self.port = port
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        deadline = time.monotonic() + 180
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self.stop()
                sys.exit(f"{' '.join(command)} did not start:\n{out[-3000:]}")
            time.sleep(0.5)

    def _answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


def conversion_rates(bodies: list[bytes]) -> tuple[float, float]:
    """Photos/s of the conversion in this process: one thread, then a thread per CPU."""
    from clf import photos

    def rate(threads: int) -> float:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(photos.load, bodies[:threads]))
            started = time.perf_counter()
            list(pool.map(photos.load, bodies * 2))
            return 2 * len(bodies) / (time.perf_counter() - started)

    return rate(1), rate(os.cpu_count() or 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--photos", type=int, default=64)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--servers", nargs="+", default=["plain", "python", "haproxy"],
                   help="which to measure: plain, python (Serve's Python proxy), haproxy")
    p.add_argument("--serve-flags", default=f"--cpus-per-replica {os.cpu_count()}",
                   help="flags for jobs/serve.py (default: one replica holding every CPU, as the plain server may use "
                        "them), e.g. '--max-batch-size 8'")
    args = p.parse_args()
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)

    from clf import data
    from tests.catalog import LARGE, write_catalog

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        test = data.load().test
        paths = write_catalog(tmp / "photos", test.images[:args.photos], **LARGE)
        bodies = [path.read_bytes() for path in paths]
        subprocess.run([PY, "-m", "tests.programs", "untrained-checkpoint", str(tmp / "checkpoint")], cwd=ROOT,
                       check=True)
        one, many = conversion_rates(bodies)
        print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; {len(bodies)} photos of about 1000 px "
              f"({sum(map(len, bodies)) / len(bodies) / 1024:.0f} KiB each)")
        print(f"conversion in one process: {one:,.0f} photos/s with 1 thread, {many:,.0f} with {os.cpu_count()} threads "
              f"({many / one:.2f}x)")
        serve = [PY, "jobs/serve.py", "--checkpoint", str(tmp / "checkpoint"), "--port", str(args.port),
                 *args.serve_flags.split()]
        servers = {
            "plain": [PY, "benchmarks/plain_server.py", "--checkpoint", str(tmp / "checkpoint"), "--port", str(args.port)],
            "serve (Python proxy)": [*serve, "--proxy", "python"],
            "serve (HAProxy)": [*serve, "--proxy", "haproxy"],
        }
        chosen = {"plain": "plain", "python": "serve (Python proxy)", "haproxy": "serve (HAProxy)"}
        servers = {name: command for name, command in servers.items() if name in {chosen[s] for s in args.servers}}
        results = {}
        for name, command in servers.items():
            server = Server(command, args.port, env)
            try:
                load(args.port, bodies, max(args.clients), 3)  # warm-up: every replica, thread and connection
                results[name] = [load(args.port, bodies, clients, args.seconds) for clients in args.clients]
            finally:
                server.stop()
            for r in results[name]:
                print(f"{name:22} {r['clients']:3} clients: {r['requests_per_s']:7.1f} requests/s, p50 {r['p50_ms']:7.1f} ms, "
                      f"p99 {r['p99_ms']:7.1f} ms, failed {r['failed']}", flush=True)
    print("\nagainst the plain server, same clients:")
    for name in [n for n in servers if n != "plain" and "plain" in results]:
        for mine, plain in zip(results[name], results["plain"]):
            print(f"  {name:22} {mine['clients']:3} clients: requests/s {mine['requests_per_s'] / plain['requests_per_s']:.2f}x, "
                  f"p50 {mine['p50_ms'] / plain['p50_ms']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""An S3-compatible server on loopback for the tests, and a proxy in front of it that fails requests on cue.

The server is moto's server mode (`moto_server`), a real process speaking S3 over HTTP on 127.0.0.1: the
clients under test (pyarrow's own S3 client, inside Ray Train, Ray Data tasks and our code) go over the
wire, as they would to AWS, MinIO or any S3-compatible store. They find it through the standard variables
(`ENV`: AWS_ENDPOINT_URL and dummy credentials), which Ray's nodes and workers inherit from the process
that starts them.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.fs as pafs

from tests.ray_cluster import free_port

MOTO_SERVER = str(Path(sys.executable).with_name("moto_server"))


def client_env(endpoint: str) -> dict[str, str]:
    """What an S3 client needs to reach `endpoint` with dummy credentials (and nothing of AWS's own)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups for credentials
    }


class S3Server:
    def __init__(self, log: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = log.open("w")
        self.proc = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the S3 server (moto_server) did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        self.env = client_env(self.endpoint)

    def _answers(self) -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            connection.request("GET", "/")
            return connection.getresponse().status == 200
        except OSError:
            return False

    def filesystem(self) -> pafs.S3FileSystem:
        """A client of our own, built directly: pyarrow's S3FileSystem() does not read AWS_ENDPOINT_URL."""
        return pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                                 endpoint_override=f"127.0.0.1:{self.port}", allow_bucket_creation=True)

    def bucket(self, name: str) -> str:
        """A new bucket; its URI."""
        self.filesystem().create_dir(name)
        return f"s3://{name}"

    def upload(self, folder: Path, uri: str) -> str:
        """Every file under `folder` to the prefix `uri` (s3://bucket/prefix), keys relative to the folder."""
        pafs.copy_files(str(folder), uri.removeprefix("s3://"), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.filesystem())
        return uri

    def keys(self, uri: str) -> list[str]:
        """The keys under the prefix `uri`, relative to it, sorted."""
        root = uri.removeprefix("s3://").rstrip("/")
        infos = self.filesystem().get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return sorted(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)

    def read(self, uri: str) -> bytes:
        with self.filesystem().open_input_file(uri.removeprefix("s3://")) as f:
            return f.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FlakyProxy:
    """An HTTP proxy on loopback in front of the S3 server that answers 503 SlowDown (S3's throttling) to
    the requests whose path contains one of `failures`' keys, as many times as its value says (None:
    always), and passes everything else through. `failed` counts the 503s given, by key."""

    def __init__(self, upstream_port: int, failures: dict[str, int | None]):
        self.failures, self.failed = dict(failures), {key: 0 for key in failures}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and "Expect: 100-continue" answered as the SDK waits for

            def _handle(self):
                with lock:
                    proxy.requests.append((self.command, self.path))
                    key = next((k for k in proxy.failures if k in self.path), None)
                    fail = key is not None and (proxy.failures[key] is None or proxy.failed[key] < proxy.failures[key])
                    if fail:
                        proxy.failed[key] += 1
                body = self._body()
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                payload = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload) if self.command != "HEAD"
                                                       else answer.getheader("Content-Length", "0")))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                upstream.close()

            def _body(self) -> bytes:
                """The request's body as it came, chunked (the SDK's uploads) or not, to pass on unchanged."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raw = b""
                while True:
                    size_line = self.rfile.readline()
                    raw += size_line
                    size = int(size_line.split(b";")[0].strip(), 16)
                    if size == 0:
                        break
                    raw += self.rfile.read(size + 2)  # the chunk and its CRLF
                while True:  # trailers, up to the empty line
                    line = self.rfile.readline()
                    raw += line
                    if line in (b"\r\n", b"\n", b""):
                        return raw

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def environment_with(env: dict[str, str]):
    """os.environ with `env` set; call the result to put the previous values back."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)

    def restore():
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return restore

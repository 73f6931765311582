"""Run ``imgembed serve`` as a child process on loopback (tests, benchmarks, scripts).

    with ServerProcess(["artifacts/test-clip-tiny-int8"], "--max-batch", "8") as server:
        EmbeddingClient(server.url).embed([...])

The server binds 127.0.0.1 on a free port (``--port 0``) and prints its address; ``start()`` returns once
``/readyz`` answers 200 and raises with the server's log if it exits or does not get ready in time. The
process is always stopped on exit (SIGTERM, then SIGKILL after ``stop_timeout``).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from imgembed.serve.client import EmbeddingClient

_LISTENING = re.compile(r"listening on (https?://\S+)")


class ServerProcess:
    """One ``python -m imgembed.cli serve ... --port 0`` child process, with its stdout/stderr in a log file."""

    def __init__(self, artifacts: Sequence[str | os.PathLike], *options: str, ready_timeout: float = 60.0,
                 stop_timeout: float = 20.0, env: dict[str, str] | None = None, ssl_context=None,
                 api_key: str | None = None):
        self.args = [sys.executable, "-m", "imgembed.cli", "serve", *map(str, artifacts), "--host", "127.0.0.1",
                     "--port", "0", *options]
        self.ready_timeout, self.stop_timeout = ready_timeout, stop_timeout
        # extra environment; TLS context and API key of the readiness probe
        self.env, self.ssl_context, self.api_key = env, ssl_context, api_key
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        fd, name = tempfile.mkstemp(prefix="imgembed-serve-", suffix=".log")
        os.close(fd)
        self._log = Path(name)
        self._final_log: str | None = None

    def log(self) -> str:
        """Everything the server printed so far (kept after stop(), which removes the file)."""
        if self._final_log is not None:
            return self._final_log
        return self._log.read_text(errors="replace")

    def start(self) -> "ServerProcess":
        with open(self._log, "wb") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=None if self.env is None else {**os.environ, **self.env})
        deadline = time.monotonic() + self.ready_timeout
        try:
            self.url = self._wait_for(lambda: (m := _LISTENING.search(self.log())) and m.group(1), deadline)
            with EmbeddingClient(self.url, timeout=5, ssl_context=self.ssl_context, api_key=self.api_key) as client:
                self._wait_for(client.ready, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for(self, probe, deadline: float):
        """Poll ``probe()`` until truthy; RuntimeError with the log if the process exits or time runs out."""
        while time.monotonic() < deadline:
            value = probe()
            if value:
                return value
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"server not ready within {self.ready_timeout:g} s:\n{self.log()[-3000:]}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if still running after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int | None:
        """SIGTERM (graceful drain), SIGKILL if it is still running after ``stop_timeout``; the exit code."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        code = self.wait(self.stop_timeout)
        if code is None:
            self.proc.kill()
            code = self.proc.wait()
        if self._final_log is None:
            self._final_log = self.log()
            self._log.unlink(missing_ok=True)
        return code

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

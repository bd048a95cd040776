"""Launch the real `tritonserver` that the nvidia-pytriton wheel bundles, with its Python backend.

The recipe and its pitfalls (PATH picks the stub's interpreter, LD_LIBRARY_PATH needs libpython,
symlinked backend files, explicit bind addresses, a unique shared-memory prefix, readiness by TCP
first) are the ones verified on this project's machines.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

from ..format.errors import PdropError


class ServerError(PdropError):
    """tritonserver is missing, failed to start, or never became ready."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError:
        raise ServerError("tritonserver not found: install the serve extra (pip install -e '.[serve]')") from None
    return Path(pytriton.__file__).parent


class TritonServer:
    """`with TritonServer(repo) as server:` starts tritonserver, waits until every model is ready."""

    def __init__(self, repo: str | Path, host: str = "127.0.0.1", grpc_port: int | None = None,
                 http_port: int | None = None, log_path: str | Path | None = None, verbose: bool = False,
                 metrics_port: int | None = None):
        """Ports left None are free ones; metrics_port 0 turns Prometheus metrics off."""
        self.repo, self.host = Path(repo).resolve(), host
        self.grpc_port = grpc_port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.metrics_port = free_port(host) if metrics_port is None else metrics_port
        self.log_path, self.verbose = log_path, verbose
        self.proc: subprocess.Popen | None = None
        self.shm_prefix = f"pdrop{uuid.uuid4().hex[:8]}_"
        self._work = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str | None:
        return f"http://{self.host}:{self.metrics_port}/metrics" if self.metrics_port else None

    def models(self) -> list[str]:
        return sorted(p.name for p in self.repo.iterdir() if (p / "config.pbtxt").is_file())

    def _backends(self) -> Path:
        """Our own backend dir: symlinks, so the stub's RPATH still finds the bundled libraries."""
        root = _pytriton_root() / "tritonserver"
        python = Path(self._work.name) / "python"
        python.mkdir()
        stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
        for src in (root / "backends/python/libtriton_python.so",
                    root / "backends/python/triton_python_backend_utils.py", stub / "triton_python_backend_stub"):
            if not src.exists():
                raise ServerError(f"incomplete nvidia-pytriton install: {src} missing")
            (python / src.name).symlink_to(src)
        return python.parent

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        bindir = str(Path(sys.executable).parent)  # the stub takes its interpreter from PATH
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        libs = [sysconfig.get_config_var("LIBDIR"), str(_pytriton_root().parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")])
        return env

    def start(self, timeout: float = 120.0) -> "TritonServer":
        if not self.models():
            raise ServerError(f"no model (a folder with config.pbtxt) in repository {self.repo}")
        binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
        if not binary.is_file():
            raise ServerError(f"tritonserver binary missing from nvidia-pytriton: {binary}")
        self._work = tempfile.TemporaryDirectory(prefix="pdrop-triton-")
        cmd = [str(binary), f"--model-repository={self.repo}", f"--backend-directory={self._backends()}",
               "--disable-auto-complete-config", "--model-control-mode=explicit",
               *[f"--load-model={m}" for m in self.models()],
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               *(["--allow-metrics=true", f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                  "--metrics-interval-ms=500"] if self.metrics_port else ["--allow-metrics=false"]),
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               "--pinned-memory-pool-byte-size=0", "--exit-timeout-secs=10",
               f"--log-verbose={int(self.verbose)}"]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if log is not subprocess.DEVNULL:
            log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        # a plain TCP connect first: a gRPC client made too early backs off for ~1 s
        for port in (self.grpc_port, *([self.metrics_port] if self.metrics_port else [])):
            while True:
                if self.proc.poll() is not None:
                    raise ServerError(f"tritonserver exited with code {self.proc.returncode} while starting"
                                      + (f"; see {self.log_path}" if self.log_path else ""))
                try:
                    socket.create_connection((self.host, port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise ServerError(f"tritonserver did not open {self.host}:{port} within {timeout:.0f} s"
                                          ) from None
                    time.sleep(0.05)
        client = grpcclient.InferenceServerClient(self.grpc_url)
        while not self._ready(client):
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.proc.returncode}: a model failed to load"
                                  + (f"; see {self.log_path}" if self.log_path else ""))
            if time.monotonic() > deadline:
                raise ServerError(f"models {self.models()} not ready within {timeout:.0f} s")
            time.sleep(0.1)
        client.close()

    def _ready(self, client) -> bool:
        try:
            return client.is_server_ready(client_timeout=1) and all(
                client.is_model_ready(m, client_timeout=1) for m in self.models())
        except Exception:  # not up yet
            return False

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL to the whole process group (the backend stubs too) if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            leftover.unlink(missing_ok=True)
        if self._work is not None:
            self._work.cleanup()
        return self.proc.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

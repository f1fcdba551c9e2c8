"""Start upstream llama.cpp's `llama-server` (built by scripts/build_llamacpp.sh) on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

from costeer.engine.models import cache_root


def find_llama_server() -> str | None:
    env = os.environ.get("COSTEER_LLAMA_SERVER")
    if env:
        return env if Path(env).is_file() else None
    built = sorted(cache_root().glob("llamacpp-*/bin/llama-server"))
    if built:
        return str(built[-1])
    return shutil.which("llama-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-server on 127.0.0.1 serving one GGUF; start() waits for /health."""

    def __init__(self, binary: str, gguf: str, port: int | None = None, threads: int = 2, log: Path | None = None):
        self.binary, self.gguf, self.threads = binary, gguf, threads
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "LlamaServer":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [self.binary, "-m", self.gguf, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(self.threads),
             "-c", "4096", "-np", "1", "--no-webui"],
            stdout=out, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("llama-server did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

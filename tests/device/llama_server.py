"""Start upstream llama.cpp's `llama-server` (built by scripts/build_llamacpp.sh) on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from costeer.engine.models import cache_root
from tests.servers import free_port, wait_http


def find_llama_server() -> str | None:
    env = os.environ.get("COSTEER_LLAMA_SERVER")
    if env:
        return env if Path(env).is_file() else None
    built = sorted(cache_root().glob("llamacpp-*/bin/llama-server"))
    if built:
        return str(built[-1])
    return shutil.which("llama-server")


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
        try:
            wait_http(self.url + "/health", self.proc, timeout)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"llama-server did not become healthy: {e}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

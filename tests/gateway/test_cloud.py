"""The gateway with the LLM behind `costeer serve`: the same text as in-process, and a cloud that
goes away mid-stream ends that stream with an error event while the gateway keeps serving."""

import time

import openai
import pytest

from costeer import CoSteer
from costeer.device import Retry, connect_cloud
from costeer.engine.models import load_lm
from costeer.gateway import GatewaySettings, create_app
from tests.cloud.server_util import KEY_A, ThreadServer
from tests.gateway.server import AppServer

QUERY = "what should I cook tonight"
CONTEXT = "my name is Sam, I live in Seattle and I like spicy tofu"
MSGS = [{"role": "user", "content": QUERY}]


def _slowed(lm, seconds: float):
    """The cloud's LLM, `seconds` slower a forward: a stream long enough to cut in the middle."""
    forward = lm.model.forward

    def slow(*a, **kw):
        time.sleep(seconds)
        return forward(*a, **kw)

    lm.model.forward = slow
    return lm


def test_a_cloud_that_goes_away_mid_stream(folders, tmp_path):
    ctx = tmp_path / "me.txt"
    ctx.write_text(CONTEXT)
    cloud = ThreadServer(_slowed(load_lm(folders["llm"], "cpu"), 0.02))
    slm = load_lm(folders["slm"], "cpu")
    llm = connect_cloud(cloud.url, api_key=KEY_A, k="full", retry=Retry(attempts=1, backoff_s=0.01))
    local = CoSteer(load_lm(folders["llm"], "cpu"), slm)
    gw = AppServer(create_app(CoSteer(llm, slm), GatewaySettings(context_file=ctx)))
    try:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=60)
        got = client.chat.completions.create(model="costeer", messages=MSGS, max_tokens=8).choices[0].message.content
        assert got == local.generate(QUERY, CONTEXT, "costeer", max_new_tokens=8).text

        stream = client.chat.completions.create(model="costeer", messages=MSGS, max_tokens=400, stream=True)
        pieces = []
        with pytest.raises(openai.APIError, match="cloud") as e:
            for c in stream:
                pieces.append(c.choices[0].delta.content or "")
                if len(pieces) == 3:
                    cloud.stop()
        assert e.value.body["code"] == "cloud_unavailable" and len(pieces) >= 3

        # the gateway is still up: the SLM alone answers, a steered request is a clean 503
        assert client.chat.completions.create(model="slm", messages=MSGS, max_tokens=3).choices[0].message.content
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="costeer", messages=MSGS, max_tokens=3)
        assert e.value.status_code == 503
    finally:
        gw.stop()
        cloud.stop()

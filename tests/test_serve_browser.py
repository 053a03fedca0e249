"""The chat page in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
Selenium): type a message, watch the reply stream in, stop a second reply mid-stream (the server
sees the abort), reset the conversation. The screenshot is saved as tests' artifact
`chat_page.png` in pytest's temporary folder (and under $LLMKIT_SCREENSHOT_DIR when set).

Without Chromium the test skips; CI sets LLMKIT_REQUIRE_BROWSER=1, and then it fails instead."""

import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

import llmkit
from llmkit.serve.app import background, create_app
from llmkit.serve.config import ServeConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and DRIVER) and not os.environ.get("LLMKIT_REQUIRE_BROWSER"),
    reason="needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1100,760"]


def abort_count(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith('llmkit:request_success_total{finished_reason="abort"}'):
                return float(line.split()[-1])
    return 0.0


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and DRIVER, "LLMKIT_REQUIRE_BROWSER is set but chromium/chromedriver are missing"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@needs_browser
@pytest.mark.slow
def test_chat_page_streams_a_reply_stops_and_resets(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model, tok = llmkit.load("smollm2-135m-instruct")
    with background(create_app(model, tok, ServeConfig(model="smollm2", compile=False))) as url:
        browser.get(url)
        wait = WebDriverWait(browser, 60, poll_frequency=0.02)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "smollm2")
        # record every text the reply bubble shows, to see it grow token by token
        browser.execute_script("""
            window.seen = [];
            new MutationObserver(() => {
              const b = document.querySelector('.assistant');
              if (b && window.seen[window.seen.length - 1] !== b.textContent) window.seen.push(b.textContent);
            }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});""")
        browser.find_element(By.ID, "system").send_keys("You are a helpful assistant. Answer in one sentence.")
        temperature = browser.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        limit = browser.find_element(By.ID, "max-tokens")
        limit.clear()
        limit.send_keys("40")
        browser.find_element(By.ID, "input").send_keys("What is the capital of France?\n")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".assistant").get_attribute("data-streaming") == "false")
        reply = browser.find_element(By.CSS_SELECTOR, ".assistant").text
        seen = browser.execute_script("return window.seen")
        assert browser.find_element(By.CSS_SELECTOR, ".user").text == "What is the capital of France?"
        assert "Paris" in reply
        assert len(seen) >= 3 and all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False))
        shot = tmp_path / "chat_page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("LLMKIT_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["LLMKIT_SCREENSHOT_DIR"]) / shot.name)

        # a long reply, stopped after its first words: the server counts the abort
        aborts = abort_count(url)
        limit.clear()
        limit.send_keys("400")
        browser.find_element(By.ID, "input").send_keys("Write a long story about a dragon.\n")
        second = lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant")[1]  # noqa: E731
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) == 2 and len(second(d).text) > 5)
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda d: second(d).get_attribute("data-streaming") == "false")
        deadline = time.time() + 20
        while abort_count(url) < aborts + 1 and time.time() < deadline:
            time.sleep(0.1)
        assert abort_count(url) == aborts + 1
        assert not browser.find_element(By.ID, "send").get_attribute("disabled")

        browser.find_element(By.ID, "reset").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []

"""The playground page in a real browser (Debian's headless Chromium through selenium) against a real stack."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import pytest

from evaluation.world import WorldSettings, draw_scene, make_scene
from llm_worker.tritonserver import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = "What colour is the large square?"
COMPRESSORS = ("avgpool", "text_recovery")
BUDGET = 64
WAIT = 180  # seconds for a page state: the first request of a fresh stack loads the compressors


def _driver(tmp_path: Path):
    from selenium import webdriver

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("Debian's chromium and chromium-driver are needed; scripts/test installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1366,900"):
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))


@pytest.fixture
def browser(tmp_path):
    driver = _driver(tmp_path)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def world_picture(tmp_path_factory) -> Path:
    """A picture of the shapes world: four flat shapes and a digit, as the eval asks about."""
    scene = make_scene(WorldSettings(seed=3), "test", 7)
    path = tmp_path_factory.mktemp("playground") / "shapes.png"
    buffer = io.BytesIO()
    draw_scene(scene).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def _wait(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        errors = [e.text for e in driver.find_elements("css selector", ".error") if e.text]
        pytest.fail(f"the page never showed {what}; errors on the page: {errors}")


# How many pixels of an overlay canvas carry a coverage colour (kept, or a merged token's).
COUNT_COLOURED = """
const canvas = arguments[0];
const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
const palette = [Playground.KEPT, ...Playground.MERGED];
const counts = {kept: 0, merged: 0};
for (let i = 0; i < data.length; i += 4) {
  if (data[i + 3] === 0) continue;
  palette.forEach((rgb, k) => {
    if (Math.abs(data[i] - rgb[0]) <= 6 && Math.abs(data[i + 1] - rgb[1]) <= 6 && Math.abs(data[i + 2] - rgb[2]) <= 6) {
      counts[k === 0 ? "kept" : "merged"] += 1;
    }
  });
}
return counts;
"""


def _api_usage(base: str, model: str, picture: Path, compressor: str) -> dict:
    """The same request the page sends, made directly: the usage the page must show."""
    import base64

    url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        "compressor": {"name": compressor},
        "visual_token_budget": BUDGET,
        "return_coverage": True,
    }
    reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    reply.raise_for_status()
    return reply.json()["usage"]["squint"]


def test_the_page_compares_two_compressors_on_an_uploaded_picture(default_stack, browser, world_picture, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base = default_stack.orchestrator_http_url.removesuffix("/v1")
    browser.get(base + "/")
    _wait(browser, lambda d: d.find_elements(By.ID, "compressor-text_recovery"), "the compressor list")
    model = browser.find_element(By.ID, "model").text
    browser.find_element(By.ID, "media").send_keys(str(world_picture))
    question = browser.find_element(By.ID, "question")
    question.clear()
    question.send_keys(QUESTION)
    for name in COMPRESSORS:
        browser.find_element(By.ID, f"compressor-{name}").click()
    budget = browser.find_element(By.ID, "budget")
    budget.clear()
    budget.send_keys(str(BUDGET))
    browser.find_element(By.ID, "run").send_keys(Keys.ENTER)  # keyboard, as a keyboard-only user would

    def panels_done(d):
        panels = d.find_elements(By.CSS_SELECTOR, "#results .panel")
        states = [p.get_attribute("data-state") for p in panels]
        return len(panels) == len(COMPRESSORS) and all(s in ("done", "error") for s in states) and panels

    panels = _wait(browser, panels_done, "both answers")
    for panel in panels:
        name = panel.get_attribute("data-compressor")
        error = panel.find_element(By.CSS_SELECTOR, ".error")
        assert not error.is_displayed(), f"{name}: {error.text}"
        assert panel.find_element(By.CSS_SELECTOR, ".answer").text.strip(), f"{name} shows no answer"
        usage = _api_usage(base, model, world_picture, name)
        [media] = usage["media"]
        shown = int(panel.find_element(By.CSS_SELECTOR, ".visual-tokens").text)
        assert shown == usage["visual_tokens"] == len(media["coverage"]) and 0 < shown <= BUDGET, name
        kept = sum(1 for patches in media["coverage"] if len(patches) == 1)
        assert int(panel.get_attribute("data-kept")) == kept, name
        assert int(panel.get_attribute("data-merged")) == len(media["coverage"]) - kept, name
        coloured = browser.execute_script(COUNT_COLOURED, panel.find_element(By.CSS_SELECTOR, ".overlay"))
        # Every token's patches are painted: kept ones in the kept colour, merged ones in the palette.
        assert coloured["kept"] > 0 if kept else coloured["kept"] == 0, (name, coloured)
        assert coloured["merged"] > 0 if kept < shown else coloured["merged"] == 0, (name, coloured)
        retained = panel.find_element(By.CSS_SELECTOR, ".retained").text
        assert retained.endswith(f"of {media['tokens_before']}"), retained
    # The two compressors keep different things: avgpool merges windows, text_recovery keeps patches.
    assert int(panels[0].get_attribute("data-kept")) == 0 < int(panels[1].get_attribute("data-kept"))
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot = tmp_path / "playground.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SQUINT_SCREENSHOT_DIR"):  # how docs/playground.png is made
        shutil.copy(screenshot, Path(os.environ["SQUINT_SCREENSHOT_DIR"]) / "playground.png")


@pytest.fixture(scope="module")
def guarded_http(default_stack) -> str:
    """A second orchestrator in front of the same workers, its API behind a token."""
    port = free_port()
    process = default_stack.orchestrator_process(
        "guarded orchestrator",
        "orchestrator-guarded",
        {
            "SQUINT_ORCHESTRATOR_AUTH_TOKENS": "s3cret",
            "SQUINT_ORCHESTRATOR_HTTP_ENABLED": "true",
            "SQUINT_ORCHESTRATOR_HTTP_PORT": str(port),
        },
    )
    process.start()
    try:
        process.wait_ready(default_stack.settings.host, timeout=120)
        yield f"http://{default_stack.settings.host}:{port}"
    finally:
        process.stop()


def test_a_wrong_token_shows_the_401_message_and_the_right_one_lists_compressors(guarded_http, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(guarded_http + "/")
    alert = browser.find_element(By.ID, "form-error")
    _wait(browser, lambda d: alert.is_displayed() and "401" in alert.text, "the 401 message without a token")
    token = browser.find_element(By.ID, "token")
    token.send_keys("wrong", Keys.TAB)
    _wait(browser, lambda d: "invalid bearer token" in alert.text, "the 401 message for a wrong token")
    assert not browser.find_elements(By.ID, "compressor-avgpool")
    token.clear()
    token.send_keys("s3cret", Keys.TAB)
    _wait(browser, lambda d: d.find_elements(By.ID, "compressor-avgpool"), "the compressors with the right token")
    assert not alert.is_displayed()

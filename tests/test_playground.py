"""The playground page, end to end in a real headless Chromium against a real server on 127.0.0.1.

Set LINALIGN_SCREENSHOT=docs/playground.png to save the page after the built-in model's run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import typer
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from typer.testing import CliRunner

from linalign import AlignConfig, Aligner, DecodeConfig
from linalign.serve import create_app
from linalign.serve import playground as playground_module
from linalign.serve.playground import STATIC, mount_playground, open_when_ready
from linalign.serve.server import serving

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
QUESTION = "What is the capital of France?"
PRINCIPLE = "Answer in lowercase letters only. Never use capital letters."
KEY = "playground-key"


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("the browser tests need Debian's chromium and chromium-driver: run `make browser` as root")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield browser
    browser.quit()


def page_url(app) -> tuple:
    mount_playground(app)
    mount_playground(app)  # idempotent
    return serving(app)


@pytest.fixture(scope="module")
def tiny_aligner(tiny) -> Aligner:
    return Aligner(tiny)


@pytest.fixture(scope="module")
def tiny_url(tiny_aligner):
    """The tiny model; the page lives at the root, the API under /v1."""
    with page_url(create_app(tiny_aligner, batch_window=0.05)) as base_url:
        yield base_url.removesuffix("v1")


@pytest.fixture(scope="module")
def keyed_url(tiny_aligner):
    with page_url(create_app(tiny_aligner, api_key=KEY)) as base_url:
        yield base_url.removesuffix("v1")


@pytest.fixture(scope="module")
def smol_url():
    # The default backend, as the command line runs it: batch-invariant, so a column decoded beside others
    # equals the command line's answer on any machine.
    with page_url(create_app(Aligner(backend="llamacpp"), batch_window=0.05)) as base_url:
        yield base_url.removesuffix("v1")


# ---- driving the page


def open_page(driver, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#principles .principle-text"))


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def type_into(driver, element_id: str, text: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def fill(driver, question: str = QUESTION, principle: str = PRINCIPLE, max_tokens: int = 12) -> None:
    type_into(driver, "question", question)
    principle_box = driver.find_element(By.CSS_SELECTOR, "#principles .principle-text")
    principle_box.clear()
    principle_box.send_keys(principle)
    type_into(driver, "max-tokens", str(max_tokens))


def choose_methods(driver, *methods: str) -> None:
    driver.find_element(By.ID, "mode-compare").click()
    for box in driver.find_elements(By.CSS_SELECTOR, 'input[name="method"]'):
        if box.is_selected() != (box.get_attribute("value") in methods):
            box.click()


def status(driver) -> str:
    return driver.find_element(By.ID, "status").text


def run_and_wait(driver, timeout: float = 30) -> str:
    driver.find_element(By.ID, "run").click()
    return wait_for_end(driver, timeout)


def wait_for_end(driver, timeout: float = 30) -> str:
    WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.ID, "stop").get_attribute("disabled"))
    return status(driver)


def columns(driver) -> list[dict]:
    """Title, streamed text, token spans, the line under it and any error, for every column shown."""
    return driver.execute_script(
        """return [...document.querySelectorAll('#columns .column')].map(c => ({
            title: c.querySelector('h2').textContent,
            text: c.querySelector('.output').textContent,
            spans: c.querySelectorAll('.output .tok').length,
            meta: c.querySelector('.meta').textContent,
            error: c.querySelector('.error').hidden ? null : c.querySelector('.error').textContent,
        }))"""
    )


def engine_text(aligner: Aligner, align: AlignConfig, max_tokens: int) -> str:
    messages = [{"role": "user", "content": QUESTION}]
    return aligner.generate([messages], align, DecodeConfig(max_new_tokens=max_tokens))[0].text


# ---- tests


def test_static_files_are_small_and_fetch_nothing_from_the_network():
    files = list(STATIC.iterdir())
    assert {f.name for f in files} >= {"index.html", "playground.css", "playground.js"}
    assert sum(f.stat().st_size for f in files) < 200_000
    for f in files:
        assert "http://" not in f.read_text() and "https://" not in f.read_text(), f.name


def test_page_loads_without_console_errors(driver, tiny_url):
    open_page(driver, tiny_url)
    assert driver.title == "linalign playground"
    WebDriverWait(driver, 5).until(lambda d: "Model:" in d.find_element(By.ID, "model-name").text)
    assert driver.find_element(By.ID, "ratio-value").get_attribute("value") == "2"
    assert console_errors(driver) == []
    assert httpx.get(tiny_url + "playground/playground.js").status_code == 200


# Text whose contrast with the first opaque background behind it is under 4.5:1 (WCAG AA), and controls
# without a label; the page's colours are opaque, so alpha only marks "transparent".
AUDIT = """
const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
const luminance = ([r, g, b]) => [r, g, b].map((v) => {
    v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
}).reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
const background = (node) => {
    for (; node instanceof Element; node = node.parentElement) {
        const c = rgb(getComputedStyle(node).backgroundColor);
        if (c.length < 4 || c[3] > 0) return c;
    }
    return [255, 255, 255];
};
const lowContrast = [];
for (const node of document.querySelectorAll("body *")) {
    const own = [...node.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own || !node.getClientRects().length) continue;
    const [a, b] = [luminance(rgb(getComputedStyle(node).color)), luminance(background(node))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) lowContrast.push(`${node.tagName} "${node.textContent.trim().slice(0, 30)}" ${ratio.toFixed(2)}`);
}
const unlabelled = [...document.querySelectorAll("input, select, textarea")]
    .filter((c) => !c.labels.length && !c.getAttribute("aria-label")).map((c) => c.id || c.name);
const positiveTabindex = [...document.querySelectorAll("[tabindex]")].filter((n) => n.tabIndex > 0).length;
const columnLefts = [...document.querySelectorAll("#columns .column")].map((c) => c.getBoundingClientRect().left);
return {lowContrast, unlabelled, positiveTabindex, columnLefts,
        overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth};
"""


@pytest.mark.parametrize("width", [1400, 375])
def test_accessible_and_usable_at_phone_width(driver, tiny_url, width):
    driver.set_window_size(width, 900)
    try:
        open_page(driver, tiny_url)
        fill(driver, max_tokens=4)
        choose_methods(driver, "base", "prompt", "la")
        driver.find_element(By.ID, "add-turn").click()
        assert run_and_wait(driver) == "Done: 3 columns."
        driver.find_element(By.CSS_SELECTOR, "#columns .tok").click()
        audit = driver.execute_script(AUDIT)
    finally:
        driver.set_window_size(1400, 1000)
    assert audit["lowContrast"] == [] and audit["unlabelled"] == [] and audit["positiveTabindex"] == 0
    assert audit["overflow"] <= 0
    stacked = len(set(audit["columnLefts"])) == 1
    assert stacked == (width == 375)
    assert driver.find_element(By.ID, "status").get_attribute("aria-live") == "polite"


def test_run_streams_every_method_into_its_column(driver, tiny_url, tiny_aligner):
    open_page(driver, tiny_url)
    fill(driver)
    choose_methods(driver, "base", "prompt", "la", "amulet")
    driver.find_element(By.ID, "question").send_keys(Keys.CONTROL, Keys.ENTER)
    assert wait_for_end(driver) == "Done: 4 columns."
    shown = columns(driver)
    assert [c["title"].split(" ")[0] for c in shown] == ["Base", "Prompt", "Linear", "Amulet"]
    for column, method in zip(shown, ["base", "prompt", "la", "amulet"], strict=True):
        principles = [] if method == "base" else [PRINCIPLE]
        assert column["text"] == engine_text(tiny_aligner, AlignConfig(method=method, principles=principles), 12)
        assert column["spans"] > 1 and column["error"] is None  # streamed in pieces
        # tokens/s needs the tokens to arrive apart, which the tiny model may not give the page
        assert re.fullmatch(r"12 tokens( · [\d.]+ tokens/s)? · finish: length", column["meta"]), column["meta"]
    driver.find_element(By.CSS_SELECTOR, "#columns .column .tok").click()
    assert driver.find_element(By.CSS_SELECTOR, "#columns .column .candidates").is_displayed()
    assert console_errors(driver) == []


def test_weights_and_turns_reach_the_server(driver, tiny_url, tiny_aligner):
    open_page(driver, tiny_url)
    fill(driver, max_tokens=8)
    choose_methods(driver, "la")
    driver.find_element(By.ID, "add-turn").click()
    driver.switch_to.active_element.send_keys("Hello.")
    driver.find_element(By.ID, "add-principle").click()
    driver.switch_to.active_element.send_keys("Be gloomy.")
    weights = driver.find_elements(By.CSS_SELECTOR, ".principle-weight")
    weights[1].clear()
    weights[1].send_keys("-0.5")
    assert run_and_wait(driver) == "Done: 1 column."
    messages = [{"role": "user", "content": "Hello."}, {"role": "user", "content": QUESTION}]
    align = AlignConfig(method="la", principles=[PRINCIPLE, "Be gloomy."], ratio=2.0, weights=[1.0, -0.5])
    want = tiny_aligner.generate([messages], align, DecodeConfig(max_new_tokens=8))[0].text
    assert columns(driver)[0]["text"] == want


def test_prompt_and_amulet_columns_never_tell_a_negative_principle(driver, tiny_url, tiny_aligner):
    """A negatively weighted principle is what Linear Alignment pushes away from; no column tells it."""
    open_page(driver, tiny_url)
    fill(driver, max_tokens=8)
    choose_methods(driver, "prompt", "amulet")
    driver.find_element(By.ID, "add-principle").click()
    driver.switch_to.active_element.send_keys("Be gloomy.")
    weights = driver.find_elements(By.CSS_SELECTOR, ".principle-weight")
    weights[1].clear()
    weights[1].send_keys("-0.5")
    assert run_and_wait(driver) == "Done: 2 columns."
    asked, config = [[{"role": "user", "content": QUESTION}]], DecodeConfig(max_new_tokens=8)
    for column, method in zip(columns(driver), ["prompt", "amulet"], strict=True):
        want = tiny_aligner.generate(asked, AlignConfig(method=method, principles=[PRINCIPLE]), config)[0].text
        assert column["text"] == want, method
    weights[0].clear()
    weights[0].send_keys("-1")  # nothing left to tell: prompting is the plain question
    choose_methods(driver, "prompt")
    assert run_and_wait(driver) == "Done: 1 column."
    assert columns(driver)[0]["text"] == tiny_aligner.generate(asked, AlignConfig(method="base"), config)[0].text


def test_sweep_shows_one_column_per_ratio(driver, tiny_url):
    open_page(driver, tiny_url)
    fill(driver, max_tokens=6)
    driver.find_element(By.ID, "mode-sweep").click()
    assert driver.find_element(By.ID, "ratios").get_attribute("value") == "0, 1, 2, 4"
    type_into(driver, "ratios", "0, 1, 2, 4, 8")
    assert run_and_wait(driver) == "Done: 5 columns."
    shown = columns(driver)
    assert [c["title"] for c in shown] == [f"Linear Alignment, r = {r}" for r in (0, 1, 2, 4, 8)]
    assert all(c["text"] and c["meta"].startswith("6 tokens") for c in shown)


def server_error(url: str, ratio: str) -> str:
    """The message of the server's own 400 for Linear Alignment at `ratio`, asked directly."""
    options = {"method": "la", "principles": [PRINCIPLE], "ratio": ratio}
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "linalign": options}
    reply = httpx.post(url + "v1/chat/completions", json=body)
    assert reply.status_code == 400
    return reply.json()["error"]["message"]


@pytest.mark.parametrize(("typed", "sent"), [("-1", -1), ("1e999", "1e999")])
def test_bad_ratio_shows_the_servers_400(driver, tiny_url, typed, sent):
    message = server_error(tiny_url, sent)
    assert "ratio" in message
    open_page(driver, tiny_url)
    fill(driver)
    choose_methods(driver, "base", "la")
    type_into(driver, "ratio-value", typed)
    assert run_and_wait(driver) == f"1 of 2 columns failed: {message}"
    base, la = columns(driver)
    assert base["error"] is None and base["text"]
    assert la["error"] == message and la["meta"].endswith("finish: error")


def test_stop_ends_the_stream(driver, tiny_url):
    open_page(driver, tiny_url)
    fill(driver, max_tokens=400)
    choose_methods(driver, "la")
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, 10).until(lambda d: columns(d)[0]["spans"] > 0)
    driver.find_element(By.ID, "stop").click()
    assert wait_for_end(driver) == "Stopped."
    stopped = columns(driver)[0]
    assert stopped["meta"].endswith("finish: stopped")
    assert int(stopped["meta"].split(" ")[0]) < 400
    time.sleep(0.3)
    assert columns(driver)[0]["text"] == stopped["text"]


def test_api_key_is_sent_stored_and_a_wrong_one_shows_the_401(driver, keyed_url):
    assert httpx.get(keyed_url).status_code == 200  # the page stays public, the key guards /v1
    open_page(driver, keyed_url)
    fill(driver, max_tokens=4)
    choose_methods(driver, "la")
    type_into(driver, "api-key", "wrong")
    assert run_and_wait(driver) == "1 of 1 columns failed: incorrect API key"
    assert columns(driver)[0]["error"] == "incorrect API key"
    type_into(driver, "api-key", KEY)
    assert run_and_wait(driver) == "Done: 1 column."
    open_page(driver, keyed_url)
    assert driver.find_element(By.ID, "api-key").get_attribute("value") == KEY
    driver.execute_script("localStorage.clear()")


def test_clicking_a_token_shows_its_candidates_in_three_distributions(driver, tiny_url):
    open_page(driver, tiny_url)
    fill(driver, max_tokens=6)
    choose_methods(driver, "la")
    assert run_and_wait(driver) == "Done: 1 column."
    driver.find_elements(By.CSS_SELECTOR, "#columns .tok")[1].click()
    panel = driver.find_element(By.CSS_SELECTOR, "#columns .candidates")
    titles = [h.text for h in panel.find_elements(By.TAG_NAME, "h4")]
    assert titles == ["Principled", "Plain", "Aligned"]
    for section in panel.find_elements(By.CSS_SELECTOR, ".distribution"):
        assert len(section.find_elements(By.TAG_NAME, "li")) == 5
    assert panel.find_elements(By.CSS_SELECTOR, "li.chosen")
    driver.find_element(By.CSS_SELECTOR, "#columns .output").send_keys(Keys.ARROW_RIGHT)
    assert panel.find_element(By.TAG_NAME, "h3").text.startswith("Token 3:")


@pytest.mark.slow
def test_greedy_linear_alignment_column_equals_the_cli(driver, smol_url):
    open_page(driver, smol_url)
    fill(driver, max_tokens=16)
    choose_methods(driver, "base", "prompt", "la")
    driver.find_element(By.ID, "ratio-value").clear()
    driver.find_element(By.ID, "ratio-value").send_keys("2")
    assert run_and_wait(driver, timeout=60) == "Done: 3 columns."
    la = columns(driver)[2]
    cli = Path(sys.executable).with_name("linalign")
    command = [cli, "generate", QUESTION, "-p", PRINCIPLE, "--method", "la", "--ratio", "2", "--max-new-tokens", "16"]
    result = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, check=True).stdout)
    assert la["text"] == result["text"]
    assert re.fullmatch(
        rf"{result['new_tokens']} tokens · [\d.]+ tokens/s · finish: {result['finish_reason']}", la["meta"]
    )
    if target := os.environ.get("LINALIGN_SCREENSHOT"):
        driver.find_elements(By.CSS_SELECTOR, "#columns .column")[2].find_element(By.CSS_SELECTOR, ".tok").click()
        save_screenshot(driver, Path(target))


def save_screenshot(driver, path: Path) -> None:
    """The whole page, as tall as its content, for the README."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    metrics = {"width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_the_browser_opens_once_the_server_answers(tiny_url, monkeypatch):
    opened = []
    monkeypatch.setattr(playground_module.webbrowser, "open", opened.append)
    open_when_ready(tiny_url, timeout=10).join(10)
    assert opened == [tiny_url]


def test_playground_command_serves_on_a_free_port(monkeypatch):
    calls = {}
    monkeypatch.setattr(playground_module, "serve", lambda **kwargs: calls.update(kwargs))
    monkeypatch.setattr(playground_module, "open_when_ready", lambda url: calls.setdefault("opened", url))
    runner = CliRunner()
    app = typer.Typer()
    app.command()(playground_module.playground)
    result = runner.invoke(app, ["--model", "tiny-path", "--ratio", "3"])
    assert result.exit_code == 0, result.output
    assert calls["host"] == "127.0.0.1" and calls["model"] == "tiny-path" and calls["ratio"] == 3.0
    assert calls["opened"] == f"http://127.0.0.1:{calls['port']}/"
    calls.clear()
    assert runner.invoke(app, ["--no-open"]).exit_code == 0 and "opened" not in calls

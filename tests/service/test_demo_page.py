"""The page at `/` and the API docs, in a real headless Chromium that can reach 127.0.0.1 only,
against a real server on the shipped models: a digit drawn with the mouse, a typed review, an
uploaded picture and WAV, a recording from the (fake) microphone, the keyboard alone, a 360 px
wide screen. Every test also checks that the browser logged no error and asked nothing of any
host but the server. A screenshot of each panel is saved in the test's tmp dir."""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from tests.service import browser
from tests.service.servers import Server, start_server
from training import images

MODELS = Path(__file__).resolve().parents[2] / "models"

@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(MODELS, tmp_path_factory.mktemp("demo") / "server.log", timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    with browser.chromium(tmp_path_factory.mktemp("chromium-profile")) as d:
        yield d


@pytest.fixture
def page(driver: WebDriver, shipped: Server) -> Iterator[WebDriver]:
    """The demo page, loaded fresh, its panels built; afterwards: no console error, no request
    to any other host."""
    browser.console_errors(driver), browser.network_requests(driver)  # the previous test's
    driver.get(f"{shipped.url}/")
    browser.wait_for(driver, "document.body.dataset.ready === 'true'")
    yield driver
    assert browser.console_errors(driver) == []
    assert [u for u in browser.network_requests(driver) if not u.startswith(shipped.url + "/")] == []


def panel(driver: WebDriver, model: str):
    return driver.find_element(By.ID, f"m-{model}")


def wait_for_answer(driver: WebDriver, model: str) -> str:
    """The top label once the panel has its answer and its explanation."""
    browser.wait_for(driver, f"document.querySelector('#m-{model} .explanation').dataset.ready === 'true'"
                     f" || document.querySelector('#m-{model} .error')")
    errors = panel(driver, model).find_elements(By.CSS_SELECTOR, ".error")
    assert not errors, errors[0].text
    return driver.execute_script(f"return document.querySelector('#m-{model} .answer').dataset.top")


def screenshot(driver: WebDriver, model: str, directory: Path) -> None:
    element = panel(driver, model)
    driver.execute_script("arguments[0].scrollIntoView()", element)
    path = directory / f"{model}.png"
    element.screenshot(str(path))
    assert Image.open(path).size[0] > 100


def test_page_has_one_panel_per_model_chosen_by_task(page):
    panels = {p.get_attribute("id"): p for p in page.find_elements(By.CSS_SELECTOR, "section.panel")}
    assert set(panels) == {"m-fashion-mnist", "m-mnist", "m-sentiment", "m-spoken-digits"}
    assert panels["m-mnist"].find_elements(By.CSS_SELECTOR, "canvas.draw")
    assert panels["m-sentiment"].find_elements(By.TAG_NAME, "textarea")
    assert panels["m-spoken-digits"].find_elements(By.CSS_SELECTOR, "input[type=file][accept='audio/*']")


def test_a_seven_drawn_on_the_mnist_canvas_is_answered_seven(page, tmp_path):
    canvas = panel(page, "mnist").find_element(By.CSS_SELECTOR, "canvas.draw")
    page.execute_script("arguments[0].scrollIntoView()", canvas)
    size = canvas.size["width"]  # offsets are from the canvas's centre
    stroke = [(-0.25, -0.3), (0.25, -0.3), (0.05, 0.0), (-0.08, 0.33)]
    actions = ActionChains(page, duration=5)
    actions.move_to_element_with_offset(canvas, int(stroke[0][0] * size), int(stroke[0][1] * size))
    actions.click_and_hold()
    for (x0, y0), (x1, y1) in itertools.pairwise(stroke):
        for t in np.linspace(0, 1, 8)[1:]:
            actions.move_to_element_with_offset(canvas, int((x0 + (x1 - x0) * t) * size),
                                                int((y0 + (y1 - y0) * t) * size))
    actions.release().perform()
    assert wait_for_answer(page, "mnist") == "7"
    bars = panel(page, "mnist").find_elements(By.CSS_SELECTOR, ".answer ol.bars li")
    assert len(bars) == 5 and bars[0].text.startswith("7")
    timing = panel(page, "mnist").find_element(By.CSS_SELECTOR, ".answer .timing").text
    assert "queue" in timing and "compute" in timing and "batch 1" in timing
    # The preprocessing is shown: the 28×28 picture sent holds the stroke, centred.
    sent = page.execute_script("""
        const c = document.querySelector('#m-mnist canvas.sent');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)
            .filter((_, i) => i % 4 === 0);""")
    sent = np.array(sent, dtype=np.float64).reshape(28, 28)
    ys, xs = np.nonzero(sent > 32)
    assert sent.max() > 200 and max(np.ptp(ys), np.ptp(xs)) in (19, 20, 21)  # fitted into 20 px
    rows, cols = np.indices(sent.shape) + 0.5
    centre = (rows * sent).sum() / sent.sum(), (cols * sent).sum() / sent.sum()
    assert np.allclose(centre, (14, 14), atol=1.5)  # centred by its mass
    heatmap = panel(page, "mnist").find_element(By.CSS_SELECTOR, "img.heatmap")
    assert page.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heatmap) == 28
    screenshot(page, "mnist", tmp_path)


def test_a_typed_review_is_answered_with_word_importances(page, tmp_path):
    box = panel(page, "sentiment").find_element(By.TAG_NAME, "textarea")
    box.send_keys("A tedious, lifeless film: the worst two hours I have spent in a cinema.")
    panel(page, "sentiment").find_element(By.XPATH, ".//button[text()='Classify']").click()
    assert wait_for_answer(page, "sentiment") == "negative"
    marks = panel(page, "sentiment").find_elements(By.CSS_SELECTOR, ".why mark")
    assert [m.text for m in marks][:3] == ["A", "tedious,", "lifeless"]
    screenshot(page, "sentiment", tmp_path)


def test_an_uploaded_picture_is_answered_and_explained_with_a_heatmap(page, tmp_path):
    fashion = images.load_fashion()
    labels = (MODELS / "fashion-mnist" / "labels.txt").read_text().split("\n")
    path = tmp_path / "boot.png"
    Image.fromarray(fashion.x_test[0]).save(path)
    panel(page, "fashion-mnist").find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
    assert wait_for_answer(page, "fashion-mnist") == labels[fashion.y_test[0]]
    heatmap = panel(page, "fashion-mnist").find_element(By.CSS_SELECTOR, "img.heatmap")
    assert page.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heatmap) == 28
    screenshot(page, "fashion-mnist", tmp_path)


def test_an_uploaded_wav_is_answered_with_a_spectrogram_of_importances(page, tmp_path):
    path = tmp_path / "seven.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "seven"], check=True)
    panel(page, "spoken-digits").find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
    assert wait_for_answer(page, "spoken-digits") == "seven"
    spectrogram = panel(page, "spoken-digits").find_element(By.CSS_SELECTOR, "img.spectrogram")
    assert page.execute_script("return arguments[0].complete && arguments[0].naturalWidth", spectrogram) > 50
    screenshot(page, "spoken-digits", tmp_path)


def test_a_recording_from_the_microphone_is_sent_as_wav_and_answered(page):
    panel(page, "spoken-digits").find_element(By.XPATH, ".//button[starts-with(text(), 'Record')]").click()
    # The fake microphone plays a tone: any label will do, what matters is that it went through.
    labels = (MODELS / "spoken-digits" / "labels.txt").read_text().split()
    assert wait_for_answer(page, "spoken-digits") in labels


def _tab_to(driver: WebDriver, css: str, presses: int = 60) -> None:
    for _ in range(presses):
        if driver.execute_script(f"return document.activeElement.matches({css!r})"):
            return
        ActionChains(driver).send_keys(Keys.TAB).perform()
    raise AssertionError(f"{css} cannot be reached with the Tab key")


def test_keyboard_alone_draws_asks_and_reads_the_answers(page):
    _tab_to(page, "#m-mnist canvas.draw")
    keys = [Keys.SPACE, *[Keys.ARROW_DOWN] * 6, Keys.SPACE, Keys.ENTER]
    ActionChains(page).send_keys(*keys).perform()
    assert wait_for_answer(page, "mnist") in [str(d) for d in range(10)]
    _tab_to(page, "#m-sentiment textarea")
    ActionChains(page).send_keys("A warm, funny and wonderful film.").key_down(Keys.CONTROL) \
        .send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
    assert wait_for_answer(page, "sentiment") == "positive"
    _tab_to(page, "#m-sentiment details.card summary")
    ActionChains(page).send_keys(Keys.ENTER).perform()
    browser.wait_for(page, "document.querySelector('#m-sentiment .card-body table')")


def test_model_card_opens_rendered_with_its_figures(page):
    card = panel(page, "mnist").find_element(By.CSS_SELECTOR, "details.card")
    card.find_element(By.TAG_NAME, "summary").click()
    browser.wait_for(page, "document.querySelector('#m-mnist .card-body img')")
    loaded = browser.wait_for(page, "Array.from(document.querySelectorAll('#m-mnist .card-body img'))"
                              ".every(i => i.complete && i.naturalWidth > 0)")
    assert loaded
    assert "test accuracy" in card.text


def test_page_fits_a_360_px_wide_screen(driver, shipped):
    # A desktop window cannot be made this narrow; the viewport can.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 360, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    try:
        driver.get(f"{shipped.url}/")
        browser.wait_for(driver, "document.body.dataset.ready === 'true'")
        assert driver.execute_script("return window.innerWidth") == 360
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 360
        assert browser.console_errors(driver) == []
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


@pytest.mark.parametrize(("path", "rendered"), [
    ("/docs", "document.querySelectorAll('.opblock').length"),
    ("/redoc", "document.querySelectorAll('[data-section-id]').length"),
])
def test_api_docs_render_their_operations_with_the_network_blocked(driver, shipped, path, rendered):
    browser.console_errors(driver), browser.network_requests(driver)  # the previous test's
    driver.get(shipped.url + path)
    assert browser.wait_for(driver, f"{rendered} > 20")
    assert "/v1/explain/{model}" in driver.find_element(By.TAG_NAME, "body").text
    assert browser.console_errors(driver) == []
    assert [u for u in browser.network_requests(driver) if not u.startswith(shipped.url + "/")] == []


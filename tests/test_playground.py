"""The playground page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven
by selenium against a live front end and tiny-model workers. Screenshots land in test-artifacts/."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import REPO

pytestmark = pytest.mark.browser

CAR = REPO / "examples" / "car.jpg"
ARTIFACTS = REPO / "test-artifacts"
TAUGHT_LABELS = ["car", "door handle", "wheel", "wheel"]


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver")
                                              else None)
    if not (browser and driver):
        assert not os.environ.get("CI"), "CI runs the browser tests: .ci/setup installs chromium chromium-driver"
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1000",
                 "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _page(browser, service):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"http://127.0.0.1:{service.front.front_end.http_port}/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: "tiny" in [o.get_attribute("value") for o in b.find_elements("css selector", "#model option")])
    return wait


def _choose(browser, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", element_id)).select_by_value(value)


def _finish(browser, screenshot: str) -> None:
    """Save the page as an artifact and check it logged no error."""
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / screenshot))
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe


def _run_until_done(browser, wait) -> None:
    wait.until(lambda b: b.find_element("id", "run").is_enabled())
    browser.find_element("id", "run").click()
    wait.until(lambda b: "DONE" in [li.get_attribute("data-type") for li in b.find_elements("css selector", "#events li")])


def test_detect_objects_in_the_browser(browser, service):
    wait = _page(browser, service)
    _choose(browser, "model", "tiny")
    _choose(browser, "task", "OD")
    assert not browser.find_element("id", "text-row").is_displayed()  # OD takes neither text nor a region
    assert not browser.find_element("id", "region-row").is_displayed()
    browser.find_element("id", "file").send_keys(str(CAR))
    _run_until_done(browser, wait)
    labels = json.loads(browser.find_element("id", "caption").get_attribute("data-labels"))
    assert labels == TAUGHT_LABELS
    kinds = [li.get_attribute("data-type") for li in browser.find_elements("css selector", "#events li")]
    assert kinds == ["QUEUED", "STARTED", "RESULT", "DONE"]
    result = json.loads(browser.find_element("id", "json").text)
    assert [box["label"] for box in result["boxes"]] == TAUGHT_LABELS
    curl = browser.find_element("id", "curl").text
    assert "-F image=@car.jpg -F model=tiny -F task=OD" in curl and curl.endswith("/v1/jobs:run")
    assert 'client.detect("car.jpg", "tiny", "OD")' in browser.find_element("id", "python").text
    browser.find_element("id", "copy").click()
    wait.until(lambda b: b.find_element("id", "status").text == "result JSON copied")
    _finish(browser, "playground-od.png")


def test_a_region_task_takes_the_region_drawn_with_the_mouse(browser, service):
    from selenium.webdriver.common.action_chains import ActionChains

    wait = _page(browser, service)
    _choose(browser, "model", "tiny")
    _choose(browser, "task", "REGION_TO_CATEGORY")
    assert browser.find_element("id", "region-row").is_displayed()
    assert not browser.find_element("id", "text-row").is_displayed()
    browser.find_element("id", "file").send_keys(str(CAR))
    canvas = browser.find_element("id", "canvas")
    wait.until(lambda b: b.execute_script("return document.getElementById('canvas').width") == 640)
    assert not browser.find_element("id", "run").is_enabled()  # a region task needs its region first
    size = canvas.size  # the canvas is drawn scaled; the page maps the mouse back to image pixels
    scale = 640 / size["width"]
    start = (-size["width"] / 2 + 34 / scale, -size["height"] / 2 + 160 / scale)
    (ActionChains(browser).move_to_element_with_offset(canvas, *start).click_and_hold()
     .move_by_offset(563 / scale, 212 / scale).release().perform())
    region = [int(v) for v in browser.find_element("id", "region").text.split(", ")]
    assert region == pytest.approx([34, 160, 597, 372], abs=4)
    _run_until_done(browser, wait)
    assert f"-F region={','.join(map(str, region))}" in browser.find_element("id", "curl").text
    result = json.loads(browser.find_element("id", "json").text)
    assert result["task"] == "TASK_TYPE_REGION_TO_CATEGORY"
    _finish(browser, "playground-region.png")


def test_errors_reach_the_page_as_their_reason(browser, service):
    wait = _page(browser, service)
    _choose(browser, "model", "tiny")
    _choose(browser, "task", "OD")
    browser.find_element("id", "beams").send_keys("99")
    browser.find_element("id", "file").send_keys(str(CAR))
    wait.until(lambda b: b.find_element("id", "run").is_enabled())
    browser.find_element("id", "run").click()
    wait.until(lambda b: "INVALID_FIELD" in b.find_element("id", "status").text)
    assert "num_beams must be between 1 and 16" in browser.find_element("id", "status").text

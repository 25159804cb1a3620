"""The dashboard in headless Chromium against the real app (uvicorn on a free loopback port).

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the ``selenium`` package
(installed by scripts/install.sh).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from service.db.models import Job, JobState
from tests.service.inference.helpers import LiveServer, SeededApp, add_job, add_key, make_app

MODEL = "qaas/tiny-llama"
OTHER_MODEL = "qaas/tiny-opt"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT_DIR = Path(os.environ.get("QAAS_SCREENSHOT_DIR", "/tmp/qaas-screenshots"))


def _recipe(method: str, wbits: int, abits: int) -> dict:
    return {"method": {"name": method}, "weight": {"bits": wbits}, "activation": {"bits": abits}}


def _metrics(quant_ppl: float, kl: float, top1: float, seconds: float, fp_ppl: float = 20.1) -> dict[str, float]:
    """The metric keys quant.pipeline.run_quantization records for a causal LM."""
    return {"fp_ppl": fp_ppl, "quant_ppl": quant_ppl, "ppl_increase_pct": 100 * (quant_ppl - fp_ppl) / fp_ppl,
            "kl_mean": kl, "top1_agreement": top1, "calibration_seconds": seconds,
            "size_bytes_fp": 1.0e6, "size_bytes_quant": 2.6e5}


@pytest.fixture
def seeded(tmp_path: Path) -> SeededApp:
    app = make_app(tmp_path)
    add_key(app, "alice")
    add_key(app, "bob")
    add_job(app, "alice", "rtn", MODEL, JobState.succeeded, 100, _recipe("rtn", 4, 8),
            metrics=_metrics(31.5, 0.42, 0.61, 1.5))
    add_job(app, "alice", "gptq", MODEL, JobState.succeeded, 100, _recipe("gptq", 4, 8), recipe_name="my-gptq",
            metrics=_metrics(24.2, 0.18, 0.83, 9.0))
    add_job(app, "alice", "quarot", MODEL, JobState.succeeded, 100, _recipe("quarot", 4, 4),
            metrics=_metrics(27.9, 0.25, 0.74, 4.0))
    add_job(app, "alice", "other", OTHER_MODEL, JobState.succeeded, 100, _recipe("rtn", 8, 8),
            metrics=_metrics(55.0, 0.01, 0.99, 0.5, fp_ppl=54.0))
    add_job(app, "alice", "running", MODEL, JobState.running, 40, _recipe("flatquant", 4, 4), message="block 3/8")
    add_job(app, "alice", "queued", MODEL, JobState.queued, 0, _recipe("smoothquant", 8, 8))
    add_job(app, "alice", "failed", MODEL, JobState.failed, 15, _recipe("osplus", 4, 4), message="out of memory")
    add_job(app, "bob", "bobs", MODEL, JobState.running, 60, _recipe("rtn", 4, 8))
    return app


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _set_progress(app: SeededApp, label: str, state: JobState, progress: int, message: str | None) -> None:
    with app.factory() as session:
        job = session.get(Job, app.jobs[label])
        job.state, job.progress, job.message = state, progress, message
        session.commit()


def test_page_and_static_files_are_served_locally(seeded: SeededApp) -> None:
    with LiveServer(seeded.app) as server:
        page = httpx.get(server.url + "/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for name in ("dashboard.js", "dashboard.css"):
            r = httpx.get(f"{server.url}/dashboard/static/{name}")
            assert r.status_code == 200 and len(r.text) > 500
            assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "")  # nothing from outside
            assert "https://" not in r.text
        assert httpx.get(server.url + "/dashboard/static/..%2Fdashboard.py").status_code == 404
        assert httpx.get(server.url + "/dashboard/static/secret.txt").status_code == 404


# Rows and charts as plain data, read in one script call.
_SNAPSHOT_JS = """
const text = (root, sel) => { const e = root.querySelector(sel); return e ? e.innerText.trim() : null; };
const rows = {};
for (const r of document.querySelectorAll('#jobs-body tr.job-row')) {
  const bar = r.querySelector('.bar'), fill = r.querySelector('.fill');
  rows[r.getAttribute('data-job-id')] = {
    state: r.getAttribute('data-state'), stateText: text(r, '.state'), pct: text(r, '.pct'),
    message: text(r, '.message'), recipe: text(r, '.recipe'), bits: text(r, '.bits'),
    valuenow: bar ? bar.getAttribute('aria-valuenow') : null,
    barWidth: bar ? bar.getBoundingClientRect().width : null,
    fillWidth: fill ? fill.getBoundingClientRect().width : null,
  };
}
const charts = [...document.querySelectorAll('#charts .chart')].map(c => {
  const ref = c.querySelector('line.reference');
  return {
    metric: c.getAttribute('data-metric'), reference: ref ? ref.getAttribute('data-value') : null,
    bars: [...c.querySelectorAll('rect.bar')].map(b => ({job: b.getAttribute('data-job-id'),
      value: b.getAttribute('data-value'), width: b.getAttribute('width'), fill: b.getAttribute('fill')})),
  };
});
return {rows, charts, compare: document.getElementById('compare-model').value,
        tableRows: document.querySelectorAll('#metrics-body tr').length};
"""


def test_dashboard_renders_jobs_live_and_compares_metrics(seeded: SeededApp, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # conditions may read an element that a poll re-renders: a stale reference just means "look again"
    wait = WebDriverWait(browser, 15, ignored_exceptions=(StaleElementReferenceException,))
    with LiveServer(seeded.app) as server:
        browser.get(f"{server.url}/dashboard#key={seeded.keys['alice']}")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#jobs-body tr.job-row")) == 7)
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "ok")
        assert "#key=" not in browser.current_url  # the key is dropped from the address bar

        # The page re-renders rows and charts on every poll: read everything in one script call (one turn of
        # the page's event loop) instead of holding element references that a re-render makes stale.
        snap = browser.execute_script(_SNAPSHOT_JS)
        rows = snap["rows"]
        assert seeded.jobs["bobs"] not in rows  # another key's job never shows
        states = {label: rows[seeded.jobs[label]]["state"] for label in ("rtn", "gptq", "running", "queued", "failed")}
        assert states == {"rtn": "succeeded", "gptq": "succeeded", "running": "running", "queued": "queued",
                          "failed": "failed"}
        running = rows[seeded.jobs["running"]]
        assert running["stateText"] == "running"
        assert running["valuenow"] == "40"
        assert running["pct"] == "40%"
        assert 0.3 < running["fillWidth"] / running["barWidth"] < 0.5
        assert running["message"] == "block 3/8"
        assert rows[seeded.jobs["gptq"]]["recipe"] == "my-gptq (gptq)"
        assert rows[seeded.jobs["quarot"]]["bits"] == "W4A4"

        # comparison: the model with the most succeeded jobs, one SVG chart per preferred metric
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#charts .chart svg rect.bar"))
        snap = browser.execute_script(_SNAPSHOT_JS)
        assert snap["compare"] == MODEL
        charts = {c["metric"]: c for c in snap["charts"]}
        # fp_ppl is drawn as the reference line of quant_ppl's chart, not as a chart of its own
        assert list(charts) == ["ppl_increase_pct", "quant_ppl", "kl_mean", "top1_agreement"]
        assert float(charts["quant_ppl"]["reference"]) == 20.1
        bars = charts["quant_ppl"]["bars"]
        values = {b["job"]: float(b["value"]) for b in bars}
        assert values == {seeded.jobs["rtn"]: 31.5, seeded.jobs["gptq"]: 24.2, seeded.jobs["quarot"]: 27.9}
        widths = {b["job"]: float(b["width"]) for b in bars}
        assert widths[seeded.jobs["rtn"]] > widths[seeded.jobs["quarot"]] > widths[seeded.jobs["gptq"]]
        assert [b["job"] for b in bars if b["fill"] == "#1f9d55"] == [seeded.jobs["gptq"]]  # lowest perplexity
        best = [b["job"] for b in charts["top1_agreement"]["bars"] if b["fill"] == "#1f9d55"]
        assert best == [seeded.jobs["gptq"]]  # highest agreement is best
        assert snap["tableRows"] == 3

        # live: the running job progresses; the page follows without a reload
        _set_progress(seeded, "running", JobState.running, 75, "block 6/8")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{seeded.jobs["running"]}"] .pct').text == "75%")
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT_DIR / "dashboard.png"))

        # switching the compared model redraws the charts
        from selenium.webdriver.support.ui import Select

        Select(browser.find_element(By.ID, "compare-model")).select_by_value(OTHER_MODEL)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#charts .chart[data-metric="quant_ppl"] rect.bar')) == 1)


def test_dashboard_reports_a_bad_key(seeded: SeededApp, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with LiveServer(seeded.app) as server:
        browser.get(f"{server.url}/dashboard#key=qaas_0123456789abcdef_{'x' * 43}")
        WebDriverWait(browser, 15).until(
            lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "error"
        )
        assert "invalid API key" in browser.find_element(By.ID, "status").text
        assert not browser.find_elements(By.CSS_SELECTOR, "#jobs-body tr.job-row")

"""The MLflow UI in a real browser: after a smoke run, the experiment shows the runs and the
accuracy and length columns, and the comparison view lists both metrics for every model.

Needs Debian's chromium and chromedriver (``.ci/run`` installs them) and selenium (the dev
extra); `make test` and `.ci/run` install chromium where apt-get exists, and the tests fail,
saying which is missing, elsewhere. The server binds 127.0.0.1 only and is
killed at the end. ``COMPACTION_SCREENSHOTS=DIR`` also saves the screenshots there (this is how
docs/mlflow-comparison.png and docs/mlflow-runs.png are made); they always land in the test's
temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"
ACCURACY = "eval/synthetic/accuracy"
TOKENS = "eval/synthetic/mean_response_tokens"
LABELS = ["rlvr", "opsd-correct", "opsd-incorrect"]


def _browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or fail with what is missing: not a silent skip."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is not installed (pip install -e '.[dev]')")
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if os.access(p, os.X_OK)), None)
    if chromium is None:
        pytest.fail("no chromium on PATH: the MLflow UI test needs Debian's chromium "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
    if driver is None:
        pytest.fail("no chromedriver on PATH: apt-get install chromium-driver (make test installs it)")
    return chromium, driver


@pytest.fixture(scope="module")
def browser_paths():
    return _browser()


@pytest.fixture(scope="module")
def smoke_study(browser_paths, smoke_data, tiny_model, tmp_path_factory, mlflow_db_template):
    """A smoke run through the real jobs, tracked in the contract's layout: RLVR from the tiny model,
    OPSD (correct, incorrect) from it, each evaluated; then `compaction report`."""
    from compaction import tracking
    from cli.main import main
    from compaction.params import load_params
    from jobs import evaluate, opsd, rlvr

    root = tmp_path_factory.mktemp("ui-project")
    shutil.copy(mlflow_db_template, root / "mlflow.db")
    # Per-round selection: this project has no group filtering step to write prompt pools.
    params = load_params(SMOKE, ["study=ui", "tracking.experiment=compaction-ui", "opsd.unit=rollout"], base=root)
    art = params.artifacts_dir
    with tracking.start_run(params.tracking, "post-train-smoke", tags={"study": "ui", "flow": "post-train"}) as parent:
        def stage(name, **tags):
            return tracking.start_run(params.tracking, name, nested=True, tags=tags)

        with stage("rlvr", stage="rlvr", model="rlvr", policy_ref=tiny_model):
            ckpts = {"rlvr": rlvr.run(params, tiny_model, smoke_data["problems"], art / "rlvr")}
        for cond in ("correct", "incorrect"):
            with stage(f"opsd-{cond}", stage="opsd", condition=cond, model=f"opsd-{cond}", policy_ref=ckpts["rlvr"],
                       out_dir=str(art / "opsd" / cond)):
                ckpts[f"opsd-{cond}"] = opsd.run(params, ckpts["rlvr"], smoke_data["problems"], art / "opsd" / cond,
                                                 cond)
        eval_ids = {}
        for label in LABELS:
            out = art / "eval" / label
            tags = {"stage": "eval", "model": label, "policy_ref": ckpts[label], "eval_dir": str(out)}
            if label.startswith("opsd-"):
                tags["condition"] = label.split("-", 1)[1]
            with stage(f"eval-{label}", **tags) as run:
                metrics = json.loads(Path(evaluate.run(params, ckpts[label], smoke_data["problems"], out)).read_text())
                # MLflow refuses "@" in metric names: pass@k is logged as pass_at_k.
                tracking.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()})
            eval_ids[label] = run.info.run_id
    os.environ["COMPACTION_HOME"] = str(root)
    try:
        assert main(["report", "--params", str(SMOKE), "--study", "ui"]) == 0
    finally:
        del os.environ["COMPACTION_HOME"]
    import mlflow

    exp = mlflow.MlflowClient(params.tracking.tracking_uri).get_experiment_by_name("compaction-ui")
    return {"root": root, "uri": params.tracking.tracking_uri, "experiment_id": exp.experiment_id,
            "parent": parent.info.run_id, "eval_ids": eval_ids, "tracking": params.tracking}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(smoke_study):
    """`mlflow ui` as `make ui` starts it (one worker, no job runners, loopback) on a free port."""
    port = _free_port()
    log = open(smoke_study["root"] / "mlflow-ui.log", "w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", smoke_study["uri"],
         "--default-artifact-root", str(smoke_study["root"] / "mlartifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"mlflow ui did not come up on {url}:\n"
                            + (smoke_study["root"] / "mlflow-ui.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def driver(browser_paths, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1920,1200", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(chromedriver), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _wait_text(driver, *texts: str, timeout: float = 60) -> str:
    """Wait until the page's text holds every one of ``texts``; returns it."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout).until(
            lambda d: all(t in d.find_element(By.TAG_NAME, "body").text for t in texts))
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        missing = [t for t in texts if t not in body]
        pytest.fail(f"{driver.current_url}: {missing} not on the page after {timeout}s; page text:\n{body[:3000]}")
    return driver.find_element(By.TAG_NAME, "body").text


def _click(driver, css: str | None = None, xpath: str | None = None, timeout: float = 30):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    locator = (By.CSS_SELECTOR, css) if css else (By.XPATH, xpath)
    el = WebDriverWait(driver, timeout).until(EC.element_to_be_clickable(locator))
    el.click()
    return el


def _close_assistant(driver):
    from selenium.webdriver.common.by import By

    for b in driver.find_elements(By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"):
        if b.is_displayed():
            b.click()


# The comparison view's metric table is two virtualized grids (names, values) whose cells of one
# row share the same `top`: the values of the row named by arguments[0], left to right.
_ROW_VALUES = """
const name = arguments[0];
const a = [...document.querySelectorAll('.ReactVirtualized__Grid a')].find(x => x.textContent.trim() === name);
if (!a) return [];
const cell = a.closest('.ReactVirtualized__Grid__innerScrollContainer > *');
const grid = cell.closest('.ReactVirtualized__Grid');
let sec = grid.parentElement;
while (sec && sec.querySelectorAll('.ReactVirtualized__Grid').length < 2) sec = sec.parentElement;
if (!sec) return [];
return [...sec.querySelectorAll('.ReactVirtualized__Grid')].filter(g => g !== grid).flatMap(g =>
  [...g.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > *')]
    .filter(c => c.style.top === cell.style.top)
    .sort((x, y) => parseFloat(x.style.left) - parseFloat(y.style.left))
    .map(c => c.textContent.trim()));
"""


def _save(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if os.environ.get("COMPACTION_SCREENSHOTS"):
        dest = Path(os.environ["COMPACTION_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest / name)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def test_experiment_page_lists_the_runs_with_accuracy_and_length_columns(driver, mlflow_ui, smoke_study, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(f"{mlflow_ui}/#/experiments/{smoke_study['experiment_id']}/runs")
    _wait_text(driver, "compaction-ui", "post-train-smoke")
    _close_assistant(driver)
    # Stage runs are nested under the flow run: expand it.
    _click(driver, css="[role=row] button[data-component-id*='runnamecellrenderer']")
    _wait_text(driver, *(f"eval-{label}" for label in LABELS), "report-ui", "opsd-correct")
    # Show the model tag and both metrics as columns (MLflow 3.17 hides metric columns by default).
    _click(driver, xpath="//button[normalize-space(.)='Columns']")
    for name in ("model", ACCURACY, TOKENS):
        _click(driver, xpath=f"//div[@role='dialog']//*[normalize-space(text())='{name}']")
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    headers = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "[role=columnheader]")]
    assert any(ACCURACY in h for h in headers) and any(TOKENS in h for h in headers), headers
    _save(driver, tmp_path, "mlflow-runs.png")


def test_the_printed_link_opens_on_the_evaluation_runs(driver, mlflow_ui, smoke_study):
    """`make ui` / `compaction demo` print tracking.eval_runs_url: the runs page filtered to the
    study's evaluation runs, not MLflow's (empty) GenAI overview."""
    from compaction.tracking import eval_runs_url

    url = eval_runs_url(smoke_study["tracking"], mlflow_ui)
    assert url.startswith(f"{mlflow_ui}/#/experiments/{smoke_study['experiment_id']}/runs?searchFilter=")
    driver.get("about:blank")  # a fresh page load, as a person opening the link (not a hash change)
    driver.get(url)
    text = _wait_text(driver, "post-train-smoke", "matching runs")
    _close_assistant(driver)
    # The evaluation runs are nested under the flow run, which MLflow shows for them: expand it
    # unless the browser remembers it expanded from an earlier page.
    if "eval-rlvr" not in text:
        _click(driver, css="[role=row] button[data-component-id*='runnamecellrenderer']")
    _wait_text(driver, *(f"eval-{label}" for label in LABELS))
    lines = driver.find_element("tag name", "body").text.splitlines()
    # Only stage=eval runs (and the flow run they hang under): 3 + 1, not the 8 runs of the study.
    assert "4 matching runs" in lines and "report-ui" not in lines, lines[20:120]


def test_comparison_view_shows_accuracy_and_length_of_every_model(driver, mlflow_ui, smoke_study, tmp_path):
    import mlflow
    from selenium.webdriver.common.by import By

    ids = [smoke_study["eval_ids"][label] for label in LABELS]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([smoke_study["experiment_id"]])})
    driver.get(f"{mlflow_ui}/#/compare-runs?{query}")
    text = _wait_text(driver, f"Comparing {len(ids)} Runs", *(f"eval-{label}" for label in LABELS), ACCURACY, TOKENS)
    _close_assistant(driver)
    _click(driver, xpath="//*[normalize-space(text())='Visualizations']")  # fold the plots: the table comes up
    # The metric rows hold the values the runs logged.
    client = mlflow.MlflowClient(smoke_study["uri"])
    for metric in (ACCURACY, TOKENS):
        shown = [float(x) for x in driver.execute_script(_ROW_VALUES, metric)]
        logged = [client.get_run(run_id).data.metrics[metric] for run_id in ids]
        assert len(shown) == len(ids) and all(abs(x - v) <= 0.006 * max(1.0, abs(v)) for x, v in zip(shown, logged)), (
            metric, shown, logged)
    assert "post-train-smoke" not in text  # only the compared eval runs, not their flow run
    _save(driver, tmp_path, "mlflow-comparison.png")

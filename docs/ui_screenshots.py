"""The README's MLflow UI screenshots, taken from a demo run's store in the browser test's headless
Chromium (its helpers: tests/test_ui.py).

    make demo
    .venv/bin/python docs/ui_screenshots.py [--params params/demo.yaml] [--out docs]

Writes ``mlflow-runs.png`` (the link `make ui` prints: the study's evaluation runs, with the model
tag, accuracy and mean length as columns) and ``mlflow-comparison.png`` (the comparison view of
the evaluation runs of the latest flow run, the ones the report compares).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_ui import _browser, _click, _close_assistant, _free_port, _wait_text  # noqa: E402


def start_ui(uri: str, artifacts: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow ui` as `make ui` starts it, on a free loopback port; (process, url) once healthy."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                             "--default-artifact-root", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"mlflow ui did not come up; see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--out", default=str(REPO / "docs"))
    args = ap.parse_args()

    import mlflow
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from compaction.params import load_params
    from compaction.report.runs import find_experiment, select_eval_runs
    from compaction.tracking import eval_runs_url

    params = load_params(args.params)
    uri, out = params.tracking.tracking_uri, Path(args.out)
    client = mlflow.MlflowClient(uri)
    experiment = find_experiment(client, params.tracking.experiment, uri)
    evals, _ = select_eval_runs(client, experiment, uri, "latest")
    metrics = [m for m in client.get_run(evals[0].run_id).data.metrics if m.startswith("eval/")]
    accuracy = next(m for m in sorted(metrics) if m.endswith("/accuracy"))
    tokens = accuracy.replace("/accuracy", "/mean_response_tokens")

    chromium, chromedriver = _browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1920,1200"):
        opts.add_argument(arg)
    proc, ui = start_ui(uri, params.root / "mlartifacts", Path("/tmp/mlflow-ui-screenshots.log"))
    driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
    try:
        driver.get(eval_runs_url(params.tracking, ui))
        text = _wait_text(driver, "matching runs")
        _close_assistant(driver)
        if "eval-" not in text:  # the evaluation runs hang under their flow runs: expand the newest
            _click(driver, css="[role=row] button[data-component-id*='runnamecellrenderer']")
            _wait_text(driver, "eval-")
        time.sleep(1)
        if "eval-opsd-all" not in driver.find_element(By.TAG_NAME, "body").text:  # the subflow's evaluations too
            driver.find_elements(By.CSS_SELECTOR, "[role=row] button[data-component-id*='runnamecellrenderer']")[-1].click()
            _wait_text(driver, "eval-opsd-all")
        _click(driver, xpath="//button[normalize-space(.)='Columns']")
        for name in ("model", accuracy, tokens):
            _click(driver, xpath=f"//div[@role='dialog']//*[normalize-space(text())='{name}']")
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        time.sleep(1)
        driver.save_screenshot(str(out / "mlflow-runs.png"))

        ids = [e.run_id for e in evals]
        query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([experiment.experiment_id])})
        driver.get(f"{ui}/#/compare-runs?{query}")
        _wait_text(driver, f"Comparing {len(ids)} Runs", accuracy, tokens)
        _close_assistant(driver)
        _click(driver, xpath="//*[normalize-space(text())='Visualizations']")  # fold the plots: the table comes up
        _click(driver, xpath="//*[normalize-space(text())='Parameters']")  # and the parameters: the metrics come up
        time.sleep(1)
        driver.save_screenshot(str(out / "mlflow-comparison.png"))
        print(f"wrote {out / 'mlflow-runs.png'} and {out / 'mlflow-comparison.png'} "
              f"({len(ids)} evaluation runs of {experiment.name})")
    finally:
        driver.quit()
        os.killpg(proc.pid, signal.SIGTERM)


if __name__ == "__main__":
    main()

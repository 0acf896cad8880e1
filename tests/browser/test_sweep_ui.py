"""What a user sees of a sweep, in a real browser (Debian's headless Chromium driven by Playwright).

``mlflow server`` runs as the README says to start it (tests/browser/servers.py); ``pd sweep`` runs the
smoke preset, made lighter, over 2 distillation learning rates x 2 update counts on its embedded Prefect
server, tracking to that MLflow; then the sweep's saved view, the link ``pd sweep`` prints, is opened:
one row per point, its grid values, and its distilled FD at every step count, the numbers MLflow holds.
Skipped, with the reason, only when no Chromium is installed.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.browser.servers import Server, start_mlflow
from tests.browser.test_ui import NO_ASSISTANT, VIEWPORT, chromium_path
from tests.pipeline.helpers import mlflow_client, pd_command

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

SWEEP = "uisweep"
LIGHT = ["teacher.updates=20", "distill.start_steps=4", "eval.num_samples=100", "eval.kid_subset_size=50",
         "eval.stochastic_gammas=[]", "eval.classifier_epochs=1", "eval.grid_size=2"]
GRID = ["distill.lr=3e-4,5e-4", "distill.updates_per_round=4,6"]
FIELDS = ("distill.lr", "distill.updates_per_round")
STEPS = (1, 2)


@dataclass
class SweepStack:
    mlflow: Server
    home: Path
    output: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SweepStack]:
    if chromium_path() is None:
        pytest.skip("no Chromium browser: install Debian's `chromium` package (apt-get install chromium) "
                    "or set PD_CHROMIUM to a Chromium binary")
    home = tmp_path_factory.mktemp("sweep-ui")
    mlflow = start_mlflow(home / "mlflow")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "PD_DEBUG"}
        env.update(PD_HOME=str(home / "pd"), OMP_NUM_THREADS="1", DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
                   PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")  # a hang bound (tests/conftest.py)
        args = ["sweep", "--name", SWEEP, "--tracking-uri", mlflow.url, *(a for o in LIGHT for a in ("--set", o)),
                *(a for g in GRID for a in ("--grid", g))]
        proc = subprocess.run([*pd_command(), *args], cwd=home, env=env, capture_output=True, text=True, timeout=800)
        assert proc.returncode == 0, f"pd sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        yield SweepStack(mlflow=mlflow, home=home, output=proc)
    finally:
        mlflow.stop()


@pytest.fixture()
def page():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        context = browser.new_context(viewport=VIEWPORT)
        context.add_init_script(NO_ASSISTANT)
        context.set_default_timeout(60_000)
        yield context.new_page()
        browser.close()


_ROWS = """() => {
  const rows = {};
  for (const cell of document.querySelectorAll('.ag-row .ag-cell')) {
    const index = cell.closest('.ag-row').getAttribute('row-index');
    (rows[index] = rows[index] || {})[cell.getAttribute('col-id')] = cell.innerText.trim();
  }
  return Object.values(rows);
}"""
# True once each named run has a row (its name the last line of the name cell) with every column non-empty.
_ROWS_FILLED = f"""w => {{
  const rows = ({_ROWS})();
  const name = r => (r['attributes.`Run Name`'] || '').trim().split('\\n').pop().trim();
  return w.names.every(n => rows.some(r => name(r) === n && w.columns.every(c => r[c])));
}}"""


def test_the_sweeps_saved_view_shows_every_points_grid_values_and_fd_per_step(stack: SweepStack, page) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect

    printed = next(line for line in stack.output.stdout.splitlines() if line.strip().startswith("sweep view"))
    link = printed.split()[-1]
    assert link.startswith(stack.mlflow.url) and f"viewStateShareKey=pd-sweep-{SWEEP}" in link, printed
    client = mlflow_client(stack.mlflow.url)
    experiment = client.get_experiment_by_name("progressive-distillation")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`pd.sweep` = '{SWEEP}' AND "
                              "tags.`pd.kind` = 'pipeline'")
    assert len(runs) == 4
    page.goto(link)
    expect(page.get_by_text(f"Sweep {SWEEP}: grid values and FD by steps").first).to_be_visible()
    for run in runs:
        expect(page.get_by_role("link", name=run.info.run_name, exact=True).first).to_be_visible()
    fd_columns = [f"metrics.`distilled_fd_digits_{n}steps`" for n in STEPS]
    param_columns = [f"params.`pd.sweep.{f}`" for f in FIELDS]
    # The grid renders its cells after the links: wait until every run's row has every column filled (the checks
    # below then say what differs; a grid that never fills them fails there after the hang bound).
    try:
        page.wait_for_function(_ROWS_FILLED, arg={"names": [r.info.run_name for r in runs],
                                                  "columns": [*param_columns, *fd_columns]})
    except PlaywrightTimeoutError:
        pass
    rows = page.evaluate(_ROWS)
    shown = {}
    for row in rows:  # the name cell shows a colour swatch's label, then the run name
        lines = row.get("attributes.`Run Name`", "").splitlines()
        if lines and lines[-1].startswith(f"{SWEEP}."):
            shown[lines[-1].strip()] = row
    assert set(shown) == {r.info.run_name for r in runs}, rows
    for run in runs:
        row = shown[run.info.run_name]
        for column, field in zip(param_columns, FIELDS, strict=True):
            assert row.get(column) == run.data.params[f"pd.sweep.{field}"], (column, row)
        for column, n in zip(fd_columns, STEPS, strict=True):
            value = run.data.metrics[f"distilled_fd_digits_{n}steps"]
            assert row.get(column) and abs(float(row[column]) - value) <= 0.01 * abs(value), (column, row, value)
    page.screenshot(path=str(stack.home / "mlflow-sweep-view.png"))

"""What MLflow's web UI shows of a pipeline: links that open its model-training view, artifact URLs, saved views.

MLflow 3 (3.18 here) opens an experiment in its GenAI view unless told otherwise. What says otherwise:

- the UI's workflow switch (*GenAI* / *Model training*, top of the sidebar) lives in each browser
  (local storage ``mlflow.workflowType_v1``, default GenAI) and, in 3.18, decides the view of every
  experiment: a link's ``workflowType`` query overrides it for that page, and nothing else does (the UI's
  ``shouldEnableWorkflowBasedNavigation`` is on, so the experiment kind is derived from the switch, never
  read from the experiment; no server setting exists). So every link carries
  ``workflowType=machine_learning``, which opens the "Model training" view (runs, not traces) whatever the
  browser last used. Opened from MLflow's home page (a link without the query), an experiment follows
  the switch: the experiment's description (``mlflow.note.content``, shown on the home page and above the
  runs table) tells a newcomer to flip it once;
- the experiment tag ``mlflow.experimentKind`` = ``custom_model_development`` declares the experiment a
  model-training one (what the UI's experiment-type selector writes; 3.18's UI does not read it for the
  view; it stays the experiment's declared kind, searchable as ``tags.`mlflow.experimentKind```).

A saved view of the runs table (the "Views" menu) is an experiment tag ``mlflow.sharedViewState.<id>``
whose value is ``{"name", "createdAt", "updatedAt", "state"}``; ``state`` is the JSON of the search
facets (``searchFilter``, ``orderByKey``, ...) and the table state (``selectedColumns``: ``metrics.`key```
...). ``#/experiments/<id>/runs?viewStateShareKey=<id>`` opens it. The UI keeps each user's own default
columns in the browser; a saved view is the way a server can offer columns to everyone.

Runs compared: MLflow's *Compare* button opens a page of last values (a parallel-coordinates plot of the
first metric, then run details, every param and every metric), where a series shows one number. Its charts
view of the experiment (``compareRunsMode=CHART``) draws each metric of the visible runs, a metric logged
at several steps as one line per run against the step; with the number of sampling steps as the step,
``distilled_fd_<dataset>`` is one chart of FD against steps, every step count of every pipeline in it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from urllib.parse import quote

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
DESCRIPTION_TAG = "mlflow.note.content"  # the experiment's description (markdown) in MLflow's UI
EXPERIMENT_DESCRIPTION = ("Progressive-distillation pipelines: one parent run per pipeline, a child run per round. "
                          "A model-training experiment: if MLflow shows traces here, switch the sidebar's toggle "
                          "from GenAI to Model training (once per browser). The view 'Pipelines: quality by "
                          "sampling steps' (Views menu) shows every pipeline's FD per step count.")
MODEL_TRAINING = "custom_model_development"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
MODEL_TRAINING_QUERY = "workflowType=machine_learning"
LOCAL_UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# The runs table's own first columns (their AG Grid column ids), kept first when a view orders its columns.
LEADING_COLUMNS = ("attributes.`Run Name`", "runDateAndNestInfo", "duration")


def experiment_url(base: str, *, experiment_id: str) -> str:
    """The experiment's runs table, in the model-training view."""
    return f"{base}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_QUERY}"


def run_url(base: str, *, experiment_id: str, run_id: str) -> str:
    """One run's page (overview: metrics, params, tags; artifacts tab), in the model-training view."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_QUERY}"


def view_url(base: str, *, experiment_id: str, view_id: str) -> str:
    """The runs table with a saved view applied."""
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={quote(view_id)}&{MODEL_TRAINING_QUERY}"


def charts_url(base: str, *, experiment_id: str, view_id: str) -> str:
    """The saved view's runs as MLflow's charts (``compareRunsMode=CHART``): a chart per metric over the view's
    runs, a metric logged at several steps as one line per run against its step."""
    return f"{view_url(base, experiment_id=experiment_id, view_id=view_id)}&compareRunsMode=CHART"


def compare_url(base: str, *, experiment_id: str, run_ids: Sequence[str]) -> str:
    """MLflow's Compare page for ``run_ids`` (their params and every metric key side by side)."""
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
    experiments = quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{base}/#/compare-runs?runs={runs}&experiments={experiments}&{MODEL_TRAINING_QUERY}"


def artifact_url(base: str, *, run_id: str, path: str) -> str:
    """A run artifact as the MLflow server serves it (``/get-artifact``, also for proxied artifact stores)."""
    return f"{base}/get-artifact?path={quote(path)}&run_uuid={run_id}"


def metric_column(name: str) -> str:
    """A metric's column key in the runs table's state."""
    return f"metrics.`{name}`"


def column_width(column: str) -> int:
    """Pixels a column needs to show its whole name (the table's default, 100 px, cuts ``..._1steps`` off)."""
    return max(100, 7 * len(column.split("`")[1] if "`" in column else column) + 24)


def view_tag(*, name: str, columns: Sequence[str], search_filter: str, created_ms: int, updated_ms: int) -> str:
    """The value of a saved view's experiment tag: the runs table sorted newest first, showing ``columns`` in
    this order, each wide enough for its name."""
    state = {"searchFilter": search_filter, "orderByKey": "attributes.start_time", "orderByAsc": False,
             "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
             "selectedColumns": list(columns), "columnOrder": [*LEADING_COLUMNS, *columns],
             "columnWidths": {c: column_width(c) for c in columns}}
    return json.dumps({"name": name, "createdAt": created_ms, "updatedAt": updated_ms,
                       "state": json.dumps(state, separators=(",", ":"))}, separators=(",", ":"))


def view_columns(tag_value: str | None) -> tuple[list[str], int | None]:
    """The columns and creation time of a saved view's tag value; ``([], None)`` for none or an unreadable one."""
    if not tag_value:
        return [], None
    try:
        envelope = json.loads(tag_value)
        columns = json.loads(envelope["state"]).get("selectedColumns", [])
        created = int(envelope["createdAt"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return [], None
    return [c for c in columns if isinstance(c, str)], created


def merged_columns(existing: Sequence[str], new: Sequence[str]) -> list[str]:
    """``existing`` columns, then those of ``new`` not among them (pipelines of other datasets or step counts
    add their keys; nothing a user or another pipeline put there is dropped)."""
    return list(dict.fromkeys([*existing, *new]))

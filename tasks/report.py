"""Publish the pipeline's report: the quality-vs-steps table, the sample grids and the sampler model.

- Store: the wide table (CSV), its long form (CSV) and markdown.
- Prefect: the concise table the CLI prints (``summary_view``, 4 significant digits) as a table
  artifact, and a markdown report that shows each model's sample grid where a browser can reach it
  (the MLflow server's artifact URL), or says where the PNG is when nothing serves it.
- MLflow, on the parent run: the tables, the report, and every headline metric per step count as its
  own key (``distilled_fd_digits_4steps``; see tasks/evaluate.py) next to the stepped series; a saved
  runs-table view of the experiment showing those keys for every pipeline (and, as MLflow's charts, the
  series: FD against sampling steps, a line per pipeline); the few-step students logged as models named
  after pipeline and steps and registered as versions of one model.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from safetensors.torch import save_file

from pd_core import evaluation
from pd_core.config import Config
from pd_core.jobs import CheckpointInfo
from pd_core.metrics import quality_long, quality_table
from pd_core.metrics.table import summary_view
from tasks.common import open_store, tracker_for
from tasks.evaluate import grid_artifact_path, is_headline
from tasks.progress import artifact_key
from tasks.results import Report, RoundResult
from tasks.tracking.sampler_model import sampler_model_name
from tasks.training import storage_error_only

FEW_STEPS = 4  # students with at most this many steps are registered as samplers
QUALITY_VIEW = "pd-quality-by-steps"  # the saved runs-table view of the experiment (MLflow's "Views" menu)
QUALITY_VIEW_NAME = "Pipelines: quality by sampling steps"
PIPELINE_RUNS = "tags.`pd.kind` = 'pipeline'"


def _register_students(cfg: Config, store, tracker, rounds: list[RoundResult], *,
                       fd_name: str | None) -> dict[str, str]:
    """Log few-step students as MLflow models; alias `best-few-step` (lowest FD) and `final` (fewest steps)."""
    name = cfg.tracking.registered_model or f"pd-{cfg.pipeline.name}"
    versions: dict[str, str] = {}
    candidates = [r for r in rounds if r.student.steps <= FEW_STEPS] or rounds[-1:]
    scored = [(r.metrics[fd_name], r.student.key) for r in candidates if r.metrics and fd_name in r.metrics]
    # Decided before logging, so they travel with the (journaled) registration: a version registered
    # while MLflow is down gets its aliases when the journal replays.
    targets = {"final": rounds[-1].student.key, "best-few-step": min(scored)[1] if scored else None}
    for r in candidates:
        student = r.student
        aliases = [a for a, key in targets.items() if key == student.key]
        marker = f"{student.key}.mlflow-{tracker.experiment}.json"
        if store.exists(marker):  # registered by an earlier run of this pipeline: no duplicate version
            versions[student.key] = json.loads(store.get_bytes(marker))["version"]
            for alias in aliases:  # the aliases may point elsewhere since (another pipeline's run): point back
                tracker.set_alias(registered_model=name, alias=alias, version=versions[student.key])
            continue
        tensors, manifest = store.load_checkpoint(student.key)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.safetensors"
            save_file(tensors, str(path))
            _, version = tracker.log_sampler_model(student.mlflow_run_id, weights_path=str(path), manifest=manifest,
                                                   registered_model=name, alias=aliases,
                                                   model_name=sampler_model_name(pipeline=cfg.pipeline.name,
                                                                                 steps=student.steps),
                                                   tags={"steps": str(student.steps), "checkpoint_uri": student.uri,
                                                         "pd.pipeline": cfg.pipeline.name,
                                                         "round": str(student.round)},
                                                   description=version_description(cfg, r, fd_name=fd_name))
        if version is not None:
            versions[student.key] = version
            store.put_bytes(marker, json.dumps({"version": version, "model": name}).encode())
    return {"registered_model": name, **{k.rsplit("/", 1)[-1]: v for k, v in versions.items()}}


def version_description(cfg: Config, result: RoundResult, *, fd_name: str | None) -> str:
    """What a registered version is, in the registry's words: steps, pipeline, round and its measured quality."""
    s = result.student
    text = (f"{s.steps}-step DDIM sampler of pipeline `{cfg.pipeline.name}`: round {s.round} "
            f"({2 * s.steps} -> {s.steps} steps).")
    value = _number((result.metrics or {}).get(fd_name)) if fd_name else None
    if value is not None:
        what = "FID" if fd_name == "fid" else "FD in our classifier's feature space"
        text += f" {fd_name} {value:.4g} at {cfg.eval.num_samples} samples ({what}; lower is better)."
    return text + f" Checkpoint: {s.uri}"


def _number(value: object) -> float | None:
    """A finite float, or None (empty cells, NaN)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(float(value)) else float(value)


def concise_rows(wide: pd.DataFrame) -> list[dict[str, object]]:
    """The CLI's table (``summary_view``) as rows: steps as integers, numbers to 4 significant digits, gaps None."""
    rows = []
    for record in summary_view(wide).to_dict(orient="records"):
        row: dict[str, object] = {}
        for column, value in record.items():
            number = _number(value)
            row[column] = int(value) if column == "steps" else (None if number is None else float(f"{number:.4g}"))
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, object]], *, headers: dict[str, str] | None = None) -> str:
    """Rows as a markdown table (numbers as :func:`concise_rows` left them, gaps empty); ``headers`` renames
    columns in the header line."""
    if not rows:
        return ""
    columns = list(rows[0])
    shown = [(headers or {}).get(c, c) for c in columns]
    lines = ["| " + " | ".join(shown) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
    lines += ["| " + " | ".join("" if r[c] is None else f"{r[c]:g}" if isinstance(r[c], float) else str(r[c])
                                for c in columns) + " |" for r in rows]
    return "\n".join(lines)


_SHORT = (("teacher_stochastic", "teacher stochastic"), ("teacher_ddim", "teacher DDIM"),
          ("_sample_accuracy", " accuracy"), ("_seconds_per_image", " s/image"), ("_gamma", " gamma"), ("_", " "))


def short_headers(columns: list[str], *, fd_name: str | None) -> dict[str, str]:
    """Header names that let the report's table fit a page: the metric's name (``_fd_digits``) dropped from the
    FD columns (the caption names it), words instead of snake case: ``teacher_ddim_fd_digits`` -> ``teacher DDIM``."""
    out = {}
    for column in columns:
        name = column.replace(f"_{fd_name}", "") if fd_name else column
        for long, short in _SHORT:
            name = name.replace(long, short)
        out[column] = name
    return out


def worse_than_teacher(rows: list[dict[str, object]], *, fd_name: str | None) -> list[str]:
    """One warning line per step count where a distilled sampler's ``fd_name`` is above (worse than) the
    teacher's DDIM at the same step count and guidance weight (``distilled_w2_...`` against
    ``teacher_ddim_w2_...``); rows as :func:`concise_rows` gives them."""
    if not fd_name:
        return []
    lines = []
    for row in rows:
        for column, value in row.items():
            if not (column.startswith("distilled") and column.endswith(f"_{fd_name}")) or value is None:
                continue
            teacher = row.get("teacher_ddim" + column[len("distilled"):])
            if isinstance(teacher, float) and isinstance(value, float) and value > teacher:
                which = column[len("distilled"):-len(fd_name) - 1].strip("_")
                at = f" at {which.replace('w', 'w = ', 1)}" if which else ""
                n = row["steps"]
                lines.append(f"the {n}-step student{at} is worse than the teacher's {n}-step DDIM ({fd_name} "
                             f"{value:g} > {teacher:g}): distil longer (distill.updates_per_round) or from a "
                             f"better teacher")
    return lines


def parent_metrics(wide: pd.DataFrame) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    """What the parent run gets from the wide table: per step count, the series values (``distilled_fd_digits``
    at step N) plus each headline value under its own key (``distilled_fd_digits_4steps``); and the
    floor's values (no step count). The distilled sampler's keys come first, its per-step keys before its
    series: MLflow's Compare page plots the first metric a run logged (``distilled_fd_digits_1steps``)."""
    by_steps: dict[int, dict[str, float]] = {}
    floor: dict[str, float] = {}
    for record in wide.to_dict(orient="records"):
        steps = int(record["steps"])
        values = {c: _number(v) for c, v in record.items() if c not in ("steps", "n_samples")}
        series = {c: v for c, v in values.items() if v is not None and not c.startswith("floor_")}
        floor.update({c: v for c, v in values.items() if v is not None and c.startswith("floor_")})
        keyed = {**{f"{c}_{steps}steps": v for c, v in series.items() if is_headline(c)}, **series}
        by_steps[steps] = dict(sorted(keyed.items(), key=lambda item: not item[0].startswith("distilled_")))
    return by_steps, floor


def quality_columns(by_steps: dict[int, dict[str, float]], *, fd_name: str) -> list[str]:
    """The saved view's metric columns: the distilled sampler's FD at each step count it was measured
    at, then the teacher's DDIM, then the floor; fewest steps first (the headline question is how good 1, 2 and
    4 steps are)."""
    steps = sorted(by_steps)
    names = [f"{sampler}_{fd_name}_{n}steps" for sampler in ("distilled", "teacher_ddim") for n in steps
             if f"{sampler}_{fd_name}_{n}steps" in by_steps[n]]
    return [*names, f"floor_{fd_name}"]


def _grid_line(label: str, *, grid_uri: str | None, run_id: str | None, tracker) -> str:
    """One model's sample grid in the report: the image itself when a server serves it, else where it is."""
    if not grid_uri:
        return f"- {label}: no sample grid"
    url = tracker.artifact_url(run_id, grid_artifact_path(grid_uri))
    if url is not None and tracker.is_server:
        return f"### {label}\n\n![sample grid]({url})\n\n[open the PNG]({url})"
    where = grid_uri[len("file://"):] if grid_uri.startswith("file://") else grid_uri
    line = f"- {label}: `{where}` (a PNG in the store; browsers do not open file:// or s3:// links from a page)"
    if url is not None:
        line += f"; once `mlflow ui` runs (command above): [open it in MLflow]({url})"
    return line


def _teacher_grid(cfg: Config, store, teacher: CheckpointInfo) -> str | None:
    """The teacher's display grid (at its first guidance weight when class-conditional), when evaluation wrote it."""
    manifest = store.read_manifest(teacher.key) if cfg.eval.enabled else None
    if manifest is None:
        return None
    w = evaluation.evaluation_weights(cfg, manifest)[0]
    key = evaluation.display_grid_key(teacher.key, sampler="ddim", steps=cfg.distill.start_steps, w=w)
    return store.uri(key) if store.exists(key) else None


def _report_markdown(cfg: Config, *, teacher: CheckpointInfo, rounds: list[RoundResult], rows: list[dict],
                     fd_name: str | None, registered: dict[str, str], report_uri: str | None, tracker,
                     parent_run_id: str | None, teacher_grid: str | None, guided: RoundResult | None = None) -> str:
    name = cfg.pipeline.name
    lines = [f"# Pipeline `{name}`", ""]
    command = tracker.ui_command()
    if command:
        lines += [f"MLflow is a local store: start its UI with `{command}`, then open the links below.", ""]
    links = [("this pipeline's MLflow run", tracker.run_link(parent_run_id).split("then open ", 1)[-1]),
             ("all pipelines by step count", tracker.view_link(QUALITY_VIEW)),
             ("compare the pipelines: FD against sampling steps", tracker.charts_link(QUALITY_VIEW) if rows else None),
             ("compare this pipeline's rounds", tracker.compare_link([r.student.mlflow_run_id for r in rounds]))]
    lines += [f"- MLflow, {text}: {url}" if not url.startswith("http") else f"- MLflow: [{text}]({url})"
              for text, url in links if url]
    if rows:
        what = "FID" if fd_name == "fid" else "FD in our classifier's feature space"
        lines += ["", "## Quality vs sampling steps", "",
                  markdown_table(rows, headers=short_headers(list(rows[0]), fd_name=fd_name)), "",
                  f"Each sampler's `{fd_name}` ({what}; lower is better). `floor`: real images scored the same "
                  f"way (the best a sampler can reach at this sample size). Every column: `quality.csv`."]
        lines += [f"> **Warning:** {line}" for line in worse_than_teacher(rows, fd_name=fd_name)]
    lines += ["", "## Samples", ""]
    for r in reversed(rounds):  # fewest steps first
        s = r.student
        label = f"{s.steps} step{'' if s.steps == 1 else 's'}: round {s.round} ({2 * s.steps}->{s.steps})"
        lines += [_grid_line(label, grid_uri=(r.metrics or {}).get("sample_grid"), run_id=s.mlflow_run_id,
                             tracker=tracker), ""]
    if guided:
        s = guided.student
        lines += [_grid_line(f"{s.steps} steps: guided student (stage 1, takes w)",
                             grid_uri=(guided.metrics or {}).get("sample_grid"), run_id=s.mlflow_run_id,
                             tracker=tracker), ""]
    lines += [_grid_line(f"teacher, {teacher.steps} steps", grid_uri=teacher_grid, run_id=teacher.mlflow_run_id,
                         tracker=tracker), ""]
    lines += ["## Checkpoints", "", f"- teacher: `{teacher.uri}`"]
    if guided:
        lines.append(f"- guided student (stage 1, {guided.student.steps} steps, takes w): `{guided.student.uri}`")
    lines += [f"- {r.student.steps}-step student: `{r.student.uri}`" for r in rounds]
    if registered:
        lines += ["", f"Registered model `{registered['registered_model']}` (aliases `final`, `best-few-step`)."]
    if report_uri:
        lines += ["", f"Quality table, every column: `{report_uri}`"]
    return "\n".join(lines)


@task(name="publish-report", task_run_name="report", cache_policy=NONE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=storage_error_only)
def publish_report_task(cfg: Config, *, teacher: CheckpointInfo, baselines: list[dict], rounds: list[RoundResult],
                        parent_run_id: str | None = None, guided: RoundResult | None = None) -> Report:
    """Quality-vs-steps table and sample grids to store, Prefect and MLflow; register the few-step samplers.

    ``guided``: guided distillation's stage-1 student, whose records join the table as ``distilled`` at
    the teacher's step count.
    """
    logger = get_run_logger()
    name = cfg.pipeline.name
    store, tracker = open_store(cfg), tracker_for(cfg)
    records = list(baselines) + [rec for r in ([guided] if guided else []) + rounds for rec in r.records]
    table, report_uri, rows = "", None, []
    fd_name = next((k for r in records for k in r if k.startswith("fd_") or k == "fid"), None)
    if records:
        wide, long = quality_table(records), quality_long(records)
        prefix = f"pipelines/{name}/report"
        store.put_bytes(f"{prefix}/quality.csv", wide.to_csv(index=False).encode())
        store.put_bytes(f"{prefix}/quality_long.csv", long.to_csv(index=False).encode())
        rows = concise_rows(wide)
        store.put_bytes(f"{prefix}/quality.md", markdown_table(rows).encode())
        table = summary_view(wide).to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")
        report_uri = store.uri(f"{prefix}/quality.csv")
        what = "FID" if fd_name == "fid" else "FD in our classifier's feature space"
        create_table_artifact(table=rows, key=artifact_key(f"{name}-quality"),
                              description=f"{name}: quality vs sampling steps ({fd_name}: {what}; lower is better; "
                                          f"every column: {report_uri})")
        tracker.log_table(parent_run_id, wide, artifact_file="quality.csv")
        tracker.log_table(parent_run_id, long, artifact_file="quality_long.csv")
        by_steps, floor = parent_metrics(wide)
        for steps, values in by_steps.items():
            tracker.log_metrics(parent_run_id, values, step=steps)
        tracker.log_metrics(parent_run_id, floor)
        if fd_name:
            tracker.save_runs_view(view_id=QUALITY_VIEW, name=QUALITY_VIEW_NAME, search_filter=PIPELINE_RUNS,
                                   metrics=quality_columns(by_steps, fd_name=fd_name))
    registered = _register_students(cfg, store, tracker, rounds, fd_name=fd_name) if rounds else {}
    teacher_grid = _teacher_grid(cfg, store, teacher)
    markdown = _report_markdown(cfg, teacher=teacher, rounds=rounds, rows=rows, fd_name=fd_name, registered=registered,
                                report_uri=report_uri, tracker=tracker, parent_run_id=parent_run_id,
                                teacher_grid=teacher_grid, guided=guided)
    create_markdown_artifact(markdown=markdown, key=artifact_key(f"{name}-report"),
                             description=f"{name}: quality, samples, where everything is")
    tracker.log_text(parent_run_id, markdown, artifact_file="report.md")
    tracker.flush()
    warnings = worse_than_teacher(rows, fd_name=fd_name)
    for line in warnings:
        logger.warning("%s", line)
    logger.info("report of %s published (%d records)", name, len(records))
    return Report(mlflow_link=tracker.run_link(parent_run_id), table=table, report_uri=report_uri,
                  registered=registered, mlflow_view=tracker.view_link(QUALITY_VIEW) if fd_name else None,
                  mlflow_compare=tracker.charts_link(QUALITY_VIEW) if fd_name else None,
                  warnings=warnings)

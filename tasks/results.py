"""Typed values the tasks and flows hand each other (checkpoint infos come from ``pd_core.jobs``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pd_core.jobs import CheckpointInfo


@dataclass(frozen=True)
class RoundResult:
    """One round (or guided distillation's stage 1): its student's checkpoint and the student's evaluation record
    (None when evaluation is off); for a class-conditional student the record at the first of its guidance
    weights, and the records at the others in ``other_weights``."""

    student: CheckpointInfo
    metrics: dict | None  # a flat record (pd_core.metrics.table) plus ``sample_grid``
    other_weights: list[dict] = field(default_factory=list)

    @property
    def records(self) -> list[dict]:
        """Every evaluation record of the student."""
        return ([self.metrics] if self.metrics else []) + list(self.other_weights)


@dataclass(frozen=True)
class Report:
    """What the report task published: where to look, and the concise quality table."""

    mlflow_link: str
    table: str = ""  # the CLI's quality table; empty without evaluation records
    report_uri: str | None = None  # quality.csv in the store
    registered: dict[str, str] = field(default_factory=dict)  # registered model name and versions
    mlflow_view: str | None = None  # MLflow's runs table of every pipeline, quality by step count
    mlflow_compare: str | None = None  # the same pipelines as charts: FD against sampling steps, a line per pipeline
    warnings: list[str] = field(default_factory=list)  # step counts where a student is worse than the teacher's DDIM


@dataclass(frozen=True)
class PipelineResult:
    """What the pipeline flow returns: the teacher, every round's student and the report."""

    pipeline: str
    teacher: CheckpointInfo
    rounds: list[CheckpointInfo]
    report: Report
    guided: CheckpointInfo | None = None  # guided distillation's stage-1 student (guidance.enabled)
    prefect_run: str | None = None  # the flow run's name
    prefect_url: str | None = None  # its page in Prefect's UI (None when Prefect cannot say where its UI is)

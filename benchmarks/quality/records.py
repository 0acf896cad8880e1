"""The quality benchmark's records in the checkpoint store: each pipeline's checkpoint keys (the teacher at
``distill.start_steps``, then each round's student), the feature classifier's manifest, and every evaluation
record of those checkpoints (the sha256-keyed caches)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from pd_core import jobs
from pd_core.evaluation import classifier_key, records_prefix
from pd_core.store import CheckpointStore


def checkpoint_keys(cfg, *, pipeline: str) -> dict[int, str]:
    """Step count -> checkpoint key of a pipeline: the teacher at ``distill.start_steps``, then each round's student."""
    return {cfg.distill.start_steps: jobs.teacher_key(pipeline),
            **{s: jobs.round_key(pipeline, round_index=i, student_steps=s)
               for i, (_, s) in enumerate(cfg.distill.rounds(), start=1)}}


def classifier_manifest(store: CheckpointStore, cfg) -> dict:
    """The manifest of the feature classifier the pipelines used (cached in the store by the first one)."""
    key = classifier_key(cfg)
    manifest = store.read_manifest(key)
    if manifest is None:
        raise SystemExit(f"error: no feature classifier at {store.uri(key)}; run the pipelines first")
    return manifest


def records_of(store: CheckpointStore, cfg, *, pipeline: str) -> list[dict]:
    """Every evaluation record of a finished pipeline's checkpoints (from the sha256-keyed caches)."""
    return records_at(store, checkpoint_keys(cfg, pipeline=pipeline).values())


def records_at(store: CheckpointStore, keys: Iterable[str]) -> list[dict]:
    """Every evaluation record of the complete checkpoints at ``keys`` (SystemExit naming one that is not)."""
    out = []
    for key in keys:
        manifest = store.read_manifest(key)
        if manifest is None:
            raise SystemExit(f"error: {store.uri(key)} is not a complete checkpoint; run without --report-only first")
        out += [json.loads(store.get_bytes(k)) for k in store.list(records_prefix(manifest["sha256"]))
                if k.endswith(".json")]
    return out

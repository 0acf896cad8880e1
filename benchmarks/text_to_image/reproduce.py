"""Text-to-image guided distillation at our scale (Meng et al., CVPR 2023, in latent space): FD and prompt accuracy
across the guidance weight w, the classifier-free-guided teacher against the distilled student.

    python -m benchmarks.text_to_image.reproduce --work runs/text_to_image/work      # preset text-to-image-cpu
    python -m benchmarks.text_to_image.reproduce --report-only                     # rebuild from a finished store
    python -m benchmarks.text_to_image.reproduce --tiny --work /tmp/t2i-tiny        # the same path, seconds-sized

Runs ``pd run --preset text-to-image-cpu --set pipeline.teacher_uri="diffusers:<--teacher>" --set data.url=<--data>``
(Prefect's embedded server, MLflow on sqlite and a local store under ``--work``; idempotent: a rerun trains and
measures nothing). The teacher folder and the captioned data default to ``runs/text_to_image/teacher`` and
``runs/text_to_image/data`` (benchmarks/text_to_image/README.md makes them), relative to the working directory. The
pipeline measures the imported Stable Diffusion-style teacher with our classifier-free-guided DDIM
(``teacher_ddim``: eps_w = (1 + w) eps(z, c) - w eps(z, ""), 2 UNet calls a step at w > 0, 1 at w = 0) and with
stock ``StableDiffusionPipeline`` (``diffusers_ddim``, guidance_scale = 1 + w) at every N of the chain and every w
of ``eval.guidance_weights``; stage 1 (the student takes w through ``time_cond_proj_dim``: 1 call a step) and each
round's student at every w. Then it writes, to ``--out``:

- ``results.csv``: preset, sampler, steps, w, metric, value, n_samples, seconds_per_image; samplers
  ``teacher_ddim``, ``diffusers_ddim``, ``distilled`` (its row at ``distill.start_steps`` is the stage-1 student)
  and the derived ``teacher_same_calls``: at a student's N and w, the ``teacher_ddim`` record whose ``unet_calls``
  equal the student's (the teacher at N/2 steps for w > 0), its own step count as metric ``teacher_steps``;
  metrics ``fd_captions`` (FD in our classifier's feature space, not Inception FID), ``prompt_accuracy``,
  ``unet_calls``, ``kid_*``, precision, recall;
- ``results.json`` (targets, floor, pairs, timings, commands, machine), ``samples.png`` (one row per class prompt:
  the guided teacher at the start steps, the students at 4, 2 and 1), RESULTS.md and the README block between its
  ``text-to-image:`` markers (skipped with one line when README.md has none).

Targets, at every w measured (lower FD is better), FD = ``fd_captions``:
(a) FD(student, 4 steps) <= 1.2 FD(guided teacher DDIM, distill.start_steps);
(b) FD(student, N) < FD(guided teacher DDIM, N) for every student N <= 8 (N = start_steps is the stage-1 student).
A target whose numbers were not measured counts as missed.

``--tiny``: a seconds-sized teacher (``train_teacher``'s tiny config) and 64 + 40 captioned images, written once
under ``--work``, then the same pipeline with :data:`TINY_SETS` as ``text-to-image-tiny``; results go to
``<work>/report`` and the README is left alone.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.guided.reproduce import (
    COLUMNS,
    WITHIN,
    checkpoint_keys,
    fd_metric,
    headline_markdown,
    pipeline_command,
    plot_grids,
    student_keys,
    value,
)
from benchmarks.quality.report_text import pipeline_wall_lines, replace_block, with_notes
from benchmarks.quality.runs import pipeline_durations, run_pipelines
from pd_core.config import load_config
from pd_core.evaluation import eval_hash, floor_key, grid_key, teacher_step_counts
from pd_core.metrics import quality_long
from pd_core.store import CheckpointStore

MODULE = "benchmarks.text_to_image.reproduce"
OUT = Path(__file__).resolve().parent
REPO = OUT.parents[1]
PRESET = "text-to-image-cpu"
TEACHER, DATA, WORK = "runs/text_to_image/teacher", "runs/text_to_image/data", "runs/text_to_image/work"
SAME_CALLS = "teacher_same_calls"
SAMPLERS = ("teacher_ddim", "diffusers_ddim", SAME_CALLS, "distilled")
LABELS = {"teacher_ddim": "guided teacher DDIM (ours)", "diffusers_ddim": "teacher, stock StableDiffusionPipeline",
          SAME_CALLS: "teacher at the student's UNet calls", "distilled": "student"}
README_START, README_END = "<!-- text-to-image:start -->", "<!-- text-to-image:end -->"
TINY_NAME = "text-to-image-tiny"
TINY_IMAGES = {"train": 64, "test": 40}
TINY_SETS = (f"pipeline.name={TINY_NAME}", "guidance.updates=2", "guidance.batch_size=8", "guidance.log_every=1",
             "guidance.checkpoint_every=2", "distill.updates_per_round=2", "distill.batch_size=8",
             "distill.log_every=1", "distill.checkpoint_every=2", "eval.num_samples=20", "eval.batch_size=20",
             "eval.kid_subsets=2", "eval.kid_subset_size=10", "eval.classifier_epochs=1", "eval.teacher_extra_steps=[]",
             "eval.guidance_weights=[0, 2]", "eval.grid_size=2")


def pipeline_overrides(*, data: str, tiny: bool = False, extra: Sequence[str] = ()) -> list[str]:
    """The ``--set`` options of the run (and of the report's config, which must be the run's): the captioned data
    (JSON-quoted only where YAML would read it as something else than that string), the tiny settings, ``extra``."""
    quoted = data if yaml.safe_load(data) == data else json.dumps(data)
    return [f"data.url={quoted}", *(TINY_SETS if tiny else ()), *extra]


def shown(args: Sequence[str]) -> str:
    """A command line for people: double quotes where no argument has one (so $PWD, for the repository, expands)."""
    return " ".join(shlex.quote(a) if '"' in a else shlex.quote(a).replace("'", '"') for a in args).replace(
        str(REPO), "$PWD")


def check_inputs(*, teacher: str, data: str) -> None:
    """Exit 2 with one line when a local teacher folder or data folder is not there (URLs are left to ``pd run``)."""
    if "://" not in teacher and not (Path(teacher) / "model_index.json").is_file():
        _bad(f"--teacher {teacher}: no model_index.json there; train the teacher with `python -m "
             f"benchmarks.text_to_image.train_teacher --out {teacher}` or pass its folder")
    if "://" not in data and not any((Path(data) / sub / "metadata.jsonl").is_file() for sub in ("", "train")):
        _bad(f"--data {data}: no metadata.jsonl in it or its train/; write it with `python -m "
             f"benchmarks.text_to_image.write_captions --out {data}/train` (and --split test to {data}/test)")


def _bad(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def ensure_tiny_inputs(work: Path, *, make: bool = True) -> tuple[str, str]:
    """The tiny teacher folder and captioned data under ``work``, made once when ``make`` (a rerun finds them)."""
    teacher, data = work / "tiny-teacher", work / "tiny-data"
    if not make:
        return str(teacher), str(data)
    from benchmarks.text_to_image.train_teacher import Trainer, tiny_config
    from benchmarks.text_to_image.write_captions import write

    if not (teacher / "model_index.json").is_file():
        Trainer(tiny_config(), out=teacher, data_url=None, save_every=100, log_every=100).run()
    for split, count in TINY_IMAGES.items():
        if not (data / split / "metadata.jsonl").is_file():
            write(data / split, split=split, limit=count)
    return str(teacher), str(data)


def same_calls_records(records: Sequence[Mapping]) -> list[dict]:
    """For each student record (N steps, w, c UNet calls) the ``teacher_ddim`` record at the same w with c calls, as
    sampler ``teacher_same_calls`` at steps N with its own step count as ``teacher_steps``; none where no teacher
    record has c calls (a 1-step student at w > 0: the guided teacher cannot take half a step)."""
    teacher = {(r["w"], r["unet_calls"]): r for r in records
               if r["sampler"] == "teacher_ddim" and r.get("unet_calls") is not None}
    out = []
    for r in records:
        match = teacher.get((r["w"], r.get("unet_calls"))) if r["sampler"] == "distilled" else None
        if match is not None:
            out.append({**match, "sampler": SAME_CALLS, "steps": r["steps"], "teacher_steps": match["steps"]})
    return out


def text_records(store: CheckpointStore, cfg, *, pipeline: str) -> list[dict]:
    """The run's records: at exactly the cache key of each sampler, step count and w the pipeline measures, under
    its evaluation settings and teacher folder (older records of the same weights, cached under other settings, are
    not read); a measurement not in the store is left out (its target then reads "not measured")."""
    from pd_core.text_evaluation import text_record_key

    keys, hash_ = checkpoint_keys(cfg, pipeline=pipeline), eval_hash(cfg)
    manifests = {k: store.read_manifest(k) for k in keys.values()}
    for key, manifest in manifests.items():
        if manifest is None:
            raise SystemExit(f"error: {store.uri(key)} is not a complete checkpoint; run without --report-only first")
    folder = manifests[keys["teacher"]]["text_to_image"]["sha256"]
    wanted = [(keys["teacher"], kind, n) for kind in ("teacher_ddim", "diffusers_ddim")
              for n in teacher_step_counts(cfg)]
    wanted += [(key, "distilled", n) for n, key in student_keys(cfg, pipeline=pipeline).items()]
    out = []
    for key, kind, n in wanted:
        for w in cfg.eval.guidance_weights:
            at = text_record_key(model_sha256=manifests[key]["sha256"], folder_sha256=folder, kind=kind, steps=n,
                                 w=w, eval_hash_=hash_)
            if store.exists(at):
                out.append(json.loads(store.get_bytes(at)))
    return out


def results_frame(*, preset: str, records: Sequence[Mapping], weights: Sequence[float]) -> pd.DataFrame:
    """Long results of the text-to-image records at the evaluated weights, plus the same-calls rows."""
    rows = [r for r in records if r.get("sampler") in SAMPLERS and r.get("w") in weights]
    if not rows:
        raise ValueError("no text-to-image evaluation records: did the pipeline run with eval.enabled=true?")
    long = quality_long([*rows, *same_calls_records(rows)])
    long.insert(0, "preset", preset)
    long = long.astype({"steps": "int64", "w": "float64"})
    order = {s: i for i, s in enumerate(SAMPLERS)}
    long = long.sort_values(["sampler", "w", "steps", "metric"],
                            key=lambda c: c.map(order) if c.name == "sampler" else c)
    return long[COLUMNS].reset_index(drop=True)


def _num(v: float) -> float | None:
    return None if math.isnan(v) else v


def _check(df: pd.DataFrame, *, target: str, metric: str, w: float, student: int, teacher: int, rule) -> dict:
    d, t = (value(df, sampler=s, steps=n, w=w, metric=metric) for s, n in (("distilled", student),
                                                                           ("teacher_ddim", teacher)))
    da, ta = (value(df, sampler=s, steps=n, w=w, metric="prompt_accuracy") for s, n in (("distilled", student),
                                                                                       ("teacher_ddim", teacher)))
    measured = not (math.isnan(d) or math.isnan(t))
    return {"target": target, "w": w, "student_steps": student, "teacher_steps": teacher, "distilled": _num(d),
            "teacher_ddim": _num(t), "ratio": d / t if measured else None, "met": bool(measured and rule(d, t)),
            "distilled_prompt_accuracy": _num(da), "teacher_prompt_accuracy": _num(ta),
            **({} if measured else {"note": "not measured"})}


def target_checks(df: pd.DataFrame, *, metric: str, start_steps: int, weights: Sequence[float],
                  student_steps: Sequence[int]) -> list[dict]:
    """The targets of the module docstring at every w, each with its numbers, verdict and both prompt accuracies."""
    checks = []
    for w in weights:
        checks.append(_check(df, target=f"4-step student within {WITHIN:g}x of the guided teacher's DDIM at "
                                        f"{start_steps} steps", metric=metric, w=w, student=4, teacher=start_steps,
                             rule=lambda d, t: d <= WITHIN * t))
        for n in sorted((s for s in student_steps if s <= 8), reverse=True):
            checks.append(_check(df, target=f"student below the guided teacher's DDIM at N={n}", metric=metric, w=w,
                                 student=n, teacher=n, rule=lambda d, t: d < t))
    return checks


def same_calls_pairs(df: pd.DataFrame) -> list[dict]:
    """Which teacher row each student row is compared with at the same UNet calls (read from ``unet_calls``)."""
    rows = df[(df.sampler == SAME_CALLS) & (df.metric.isin(["teacher_steps", "unet_calls"]))]
    pairs = rows.pivot_table(index=["w", "steps"], columns="metric", values="value", aggfunc="first").reset_index()
    return [{"w": float(r.w), "student_steps": int(r.steps), "teacher_steps": int(r.teacher_steps),
             "unet_calls": int(r.unet_calls)} for r in pairs.sort_values(["w", "steps"], ascending=[True, False])
            .itertuples()]


def _plural(n: float, word: str) -> str:
    return f"{n:.0f} {word}{'s' * (n != 1)}"


def _nan(v: float | None) -> float:
    return math.nan if v is None else v


def _fmt(v: float, spec: str = ".3g") -> str:
    return "" if math.isnan(v) else format(v, spec)


def steps_markdown(df: pd.DataFrame, *, metric: str, w: float) -> str:
    """One w: rows are step counts, columns the samplers; cells FD (prompt accuracy), UNet calls; bold where the
    student is below the guided teacher's DDIM at the same N."""
    lines = ["| steps | " + " | ".join(LABELS[s] for s in SAMPLERS) + " |", "|---:|" + "---:|" * len(SAMPLERS)]
    for n in sorted({int(s) for s in df.steps}, reverse=True):
        cells = []
        for s in SAMPLERS:
            fd = value(df, sampler=s, steps=n, w=w, metric=metric)
            acc = value(df, sampler=s, steps=n, w=w, metric="prompt_accuracy")
            calls = value(df, sampler=s, steps=n, w=w, metric="unet_calls")
            cell = f"{_fmt(fd)} ({_fmt(acc, '.2f')}), {_plural(calls, 'call')}" if not math.isnan(fd) else ""
            if cell and s == SAME_CALLS:
                cell += f": {_plural(value(df, sampler=s, steps=n, w=w, metric='teacher_steps'), 'step')}"
            if cell and s == "distilled" and fd < value(df, sampler="teacher_ddim", steps=n, w=w, metric=metric):
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compact_markdown(df: pd.DataFrame, *, metric: str, start_steps: int, weights: Sequence[float]) -> str:
    """The guided benchmark's headline layout (teacher | student per w) with prompt accuracy in brackets."""
    renamed = df.assign(metric=df.metric.replace({"prompt_accuracy": "sample_accuracy"}))
    return headline_markdown(renamed, metric=metric, start_steps=start_steps, weights=weights)


def update_readme(readme: Path, block: str) -> bool:
    """Replace the text between the README's text-to-image markers; without them, say so in one line and skip."""
    text = replace_block(readme.read_text(), block, start=README_START, end=README_END)
    if text is None:
        print(f"{readme} has no {README_START} / {README_END} markers: README block not written", flush=True)
        return False
    readme.write_text(text)
    return True


def _teacher_record(teacher_uri: str) -> dict:
    """The teacher folder's train.json (train_teacher's settings), when the folder is local and has one."""
    path = Path(teacher_uri.removeprefix("diffusers:")) / "train.json"
    return json.loads(path.read_text()) if "://" not in teacher_uri and path.is_file() else {}


def build_report(*, preset: str, work: Path, out: Path, overrides: Sequence[str], teacher_uri: str,
                 readme: Path | None, report_command: str, grid_w: float | None = None) -> dict:
    """Every results file of the module docstring from the finished pipeline's store and MLflow database."""
    from benchmarks.speed.common import machine
    from pd_core.text_evaluation import text_feature_context, unet_calls, write_text_grid

    work = work.resolve()
    store = CheckpointStore(str(work / "store"))
    # the run's config: pd run --teacher-uri U sets pipeline.teacher_uri to the string U
    cfg = load_config(preset=preset, overrides=[*overrides, f"pipeline.teacher_uri={json.dumps(teacher_uri)}"])
    name, weights, start = cfg.pipeline.name, list(cfg.eval.guidance_weights), cfg.distill.start_steps
    keys, students = checkpoint_keys(cfg, pipeline=name), student_keys(cfg, pipeline=name)
    records = text_records(store, cfg, pipeline=name)  # SystemExit naming a checkpoint that is not complete
    folder = store.read_manifest(keys["teacher"])["text_to_image"]["sha256"]
    df = results_frame(preset=preset, records=records, weights=weights)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    metric = fd_metric(df)
    ctx = text_feature_context(cfg, store)  # cached by the run: loads the classifier and the reference statistics
    floor_at = floor_key(cfg, extractor_id=ctx.extractor_id)
    floor = json.loads(store.get_bytes(floor_at)) if store.exists(floor_at) else None
    checks = target_checks(df, metric=metric, start_steps=start, weights=weights, student_steps=sorted(students))

    grid_w = grid_w if grid_w is not None else weights[len(weights) // 2]
    calls = unet_calls(sampler="teacher_ddim", steps=start, w=grid_w)
    panels = []
    for label, key, n in [(f"guided teacher DDIM, {start} steps ({calls} UNet calls)", keys["teacher"], start),
                          *((f"student, {n} step{'s' * (n > 1)} ({n} UNet call{'s' * (n > 1)})", students[n], n)
                            for n in (4, 2, 1) if n in students)]:
        write_text_grid(cfg, store, key=key, steps=n, w=grid_w)  # the run's grid; sampled here only if missing
        panels.append((label, store.get_bytes(grid_key(key, sampler="ddim", steps=n, w=grid_w))))
    rows = (f"rows ask for '{cfg.eval.prompt_template.format('<class>')}': {', '.join(cfg.eval.class_names)}"
            if cfg.eval.class_names else "rows: the data's captions in turn")
    plot_grids(panels, path=out / "samples.png",
               title=f"{name}, w = {grid_w:g}, the same latents in every panel; {rows}")

    summary = {"preset": preset, "pipeline": name, "machine": machine(),
               "report_command": report_command,
               "command": shown(pipeline_command(preset=preset, work=work, overrides=overrides,
                                                 teacher_uri=teacher_uri)),
               "metric": metric, "n_samples": int(df["n_samples"].max()), "start_steps": start, "weights": weights,
               "grid_w": grid_w, "w_range": [cfg.guidance.w_min, cfg.guidance.w_max],
               "teacher_uri": cfg.pipeline.teacher_uri, "data_url": cfg.data.url, "teacher_folder_sha256": folder,
               "teacher_training": _teacher_record(cfg.pipeline.teacher_uri or ""),
               "classifier_test_accuracy": ctx.classifier.test_accuracy if ctx.classifier else None,
               "floor": floor, "eval_seed": cfg.eval.seed, "pipeline_seed": cfg.pipeline.seed, "targets": checks,
               "same_calls_pairs": same_calls_pairs(df),
               "train_seconds": {k: store.read_manifest(key).get("train_seconds") for k, key in keys.items()},
               "pipeline_wall_seconds": pipeline_durations(f"sqlite:///{work / 'mlflow.db'}", pipelines=(name,))}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    results_md = out / "RESULTS.md"
    old = results_md.read_text() if results_md.exists() else ""
    results_md.write_text(with_notes(results_markdown(summary, cfg=cfg, df=df), old=old))
    if readme is not None:
        update_readme(readme, readme_block(summary, table=compact_markdown(df, metric=metric, start_steps=start,
                                                                           weights=weights)))
    return summary


def _targets_met(summary: Mapping) -> str:
    missed = [f"{c['target']} at w={c['w']:g}" for c in summary["targets"] if not c["met"]]
    return (f"{len(summary['targets']) - len(missed)} of {len(summary['targets'])}"
            + (f" (missed: {'; '.join(missed)})" if missed else ""))


def readme_block(summary: Mapping, *, table: str) -> str:
    return (f"Captioned Fashion-MNIST, a Stable Diffusion-style latent teacher, preset `{summary['preset']}`, on this "
            f"2-core CPU machine (`{summary['report_command']}`; commands, timings, the full tables and notes in "
            f"[benchmarks/text_to_image/RESULTS.md](benchmarks/text_to_image/RESULTS.md)). `{summary['metric']}` (FD "
            f"in our classifier's feature space, not Inception FID; lower is better) with the prompt accuracy in "
            f"brackets, {summary['n_samples']} class-balanced prompts per cell. The guided teacher makes 2 UNet calls "
            f"per step (at w > 0), the student 1. Bold: the student is below the guided teacher's DDIM at the same "
            f"number of steps. Targets met: {_targets_met(summary)}.\n\n{table}\n\n"
            f"![samples](benchmarks/text_to_image/samples.png)")


def _cut_lines(summary: Mapping, *, cfg) -> list[str]:
    """What was made small to fit a CPU, read from the config and the teacher's train.json."""
    t = summary["teacher_training"]
    sizes = t.get("sizes", {})
    teacher = (f"the teacher: {t['vae_updates']} VAE updates then {t['unet_updates']} UNet updates x "
               f"{t['batch_size']} on {t['images']} images, a UNet of {t['unet_parameters']:,} parameters "
               f"(channels {sizes.get('unet_channels')}), a {sizes.get('text_layers')}-layer CLIP text encoder of "
               f"width {sizes.get('text_hidden')}" if t else "the teacher: imported (no train.json in its folder)")
    return [f"- **Cut to fit the CPU:** {cfg.data.image_size} x {cfg.data.image_size} images, {teacher}; stage 1 "
            f"{cfg.guidance.updates} updates, each round {cfg.distill.updates_per_round} updates; "
            f"{summary['n_samples']} samples per measurement; w in {summary['weights']}."]


def results_markdown(summary: Mapping, *, cfg, df: pd.DataFrame) -> str:
    """RESULTS.md: command, machine, settings, the per-w tables, the same-calls pairs, the targets, wall times."""
    metric, start, floor = summary["metric"], summary["start_steps"], summary["floor"]
    acc = summary["classifier_test_accuracy"]
    lines = [f"# Text-to-image guided distillation: `{summary['pipeline']}` (Meng et al., CVPR 2023, in latent space, "
             "at our scale)", "", "Produced by one command (from the repo root, venv active):", "",
             f"    {summary['report_command']}", "",
             "which runs this pipeline (idempotent: a rerun trains and measures nothing) and then writes this file, "
             "`results.csv`, `results.json` and `samples.png`:", "", f"    {summary['command']}", "",
             f"- **Machine:** {re.sub(r' [(][0-9]+ threads[)]', '', summary['machine'])}; no GPU; the pipeline "
             f"ran with runtime.threads = {cfg.runtime.threads or 'torch default'}.",
             f"- **Teacher:** `{summary['teacher_uri']}` (a Stable Diffusion-style folder, imported; sha256 "
             f"{(summary['teacher_folder_sha256'] or '')[:12]}). `teacher_ddim`: our trailing DDIM with classifier-"
             "free guidance eps_w = (1 + w) eps(z, c) - w eps(z, \"\"), 2 UNet calls per step at w > 0 (1 at w = 0). "
             "`diffusers_ddim`: stock StableDiffusionPipeline with the folder's DDIMScheduler settings at "
             "guidance_scale = 1 + w, on the same latents and prompts.",
             f"- **Metric:** `{metric}` = FD in our classifier's feature space (not Inception FID), a classifier "
             f"trained on the captioned images" + (f" ({acc:.2%} test accuracy)" if acc is not None else "")
             + "; `prompt_accuracy` = the fraction of samples that classifier puts in the class the prompt names. "
             f"{summary['n_samples']} samples per measurement, prompts '{cfg.eval.prompt_template}' class-balanced, "
             f"the same latents for every sampler (eval seed {summary['eval_seed']}), against the data's test split; "
             f"pipeline seed {summary['pipeline_seed']}.",
             "- **Floor:** " + (f"real vs real at the same N ({summary['n_samples']} training images against the test "
                                f"split): {metric} {floor[metric]:.4g}." if floor
                                else "not recorded by this evaluation."),
             f"- **Stage 1:** {cfg.guidance.updates} updates x {cfg.guidance.batch_size}, w ~ U{summary['w_range']}, "
             f"lr {cfg.guidance.lr:g}; its student (the teacher's UNet plus a zero-initialised guidance embedding) "
             f"samples in {start} steps, 1 UNet call each: the `distilled` row at {start} steps.",
             f"- **Stage 2:** rounds {start} -> {cfg.distill.final_steps}, {cfg.distill.updates_per_round} updates x "
             f"{cfg.distill.batch_size} each, w ~ U{summary['w_range']} and the prompt embedding as inputs.",
             *_cut_lines(summary, cfg=cfg), ""]
    for w in summary["weights"]:
        lines += [f"## w = {w:g}", "", steps_markdown(df, metric=metric, w=w), ""]
    lines += [f"`{metric}` (prompt accuracy), UNet calls of one sample. Bold: the student is below the guided "
              "teacher's DDIM at the same number of steps.", "", "![samples](samples.png)", "",
              "## The same number of UNet calls", "",
              "The column \"teacher at the student's UNet calls\" is the `teacher_ddim` row whose recorded "
              "`unet_calls` equal the student's at the same w (`teacher_same_calls` in results.csv); the pairs used:",
              ""]
    lines += [f"- w = {p['w']:g}: student {_plural(p['student_steps'], 'step')} vs teacher "
              f"{_plural(p['teacher_steps'], 'step')}, {_plural(p['unet_calls'], 'UNet call')} each"
              for p in summary["same_calls_pairs"]]
    lines += ["", "A student with no pair has no teacher row with as few calls (the guided teacher's fewest is 2).",
              "", "## Targets", "",
              "| target | w | student | guided teacher | ratio | prompt accuracy (student / teacher) | met |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for c in summary["targets"]:
        pa = " / ".join(_fmt(_nan(c[k]), ".2f") for k in ("distilled_prompt_accuracy", "teacher_prompt_accuracy"))
        nums = [_fmt(_nan(c[k])) for k in ("distilled", "teacher_ddim", "ratio")]
        verdict = "yes" if c["met"] else "**no**" + (f" ({c['note']})" if "note" in c else "")
        lines.append(f"| {c['target']} | {c['w']:g} | {' | '.join(nums)} | {pa} | {verdict} |")
    lines += ["", f"Targets met: {_targets_met(summary)}.", "", "## Wall times", "",
              "| stage | training seconds |", "|---|---:|"]
    lines += [f"| {stage} | {_fmt(sec) if sec is not None else 'imported'} |"
              for stage, sec in summary["train_seconds"].items()]
    lines.append("")
    lines += pipeline_wall_lines(summary["pipeline_wall_seconds"])
    return "\n".join(lines)


def report_command(*, work: str, teacher: str | None, data: str | None, tiny: bool, extra: Sequence[str]) -> str:
    """The command line that made a report (defaults left out; $PWD for the repository)."""
    args = ["python", "-m", MODULE, *(["--tiny"] if tiny else []), "--work", work]
    args += [*(["--teacher", teacher] if teacher else []), *(["--data", data] if data else [])]
    args += [a for o in extra for a in ("--set", o)]
    return shown(args)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help=f"store, MLflow db and logs (default {WORK}; with --tiny "
                                             "runs/text_to_image/tiny)")
    p.add_argument("--teacher", help=f"the Stable Diffusion-style teacher folder (default {TEACHER})")
    p.add_argument("--data", help=f"the captioned imagefolder, with train/ and test/ (default {DATA})")
    p.add_argument("--out", type=Path, help="where the results files go (default benchmarks/text_to_image; "
                                            "with --tiny <work>/report)")
    p.add_argument("--report-only", action="store_true", help="do not run the pipeline; rebuild from the store")
    p.add_argument("--tiny", action="store_true", help="a seconds-sized teacher and data under --work, tiny settings")
    p.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    p.add_argument("--grid-w", type=float, help="guidance weight of samples.png (default: the middle evaluated w)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to pd run (settings outside the training hash, e.g. runtime.threads=1) and recorded")
    args = p.parse_args(argv)
    if args.tiny and (args.teacher or args.data):
        _bad("--tiny makes its own teacher and data under --work; leave out --teacher and --data")
    work = args.work or Path("runs/text_to_image/tiny" if args.tiny else WORK)
    out = args.out or (work / "report" if args.tiny else OUT)
    if args.tiny:
        teacher, data = ensure_tiny_inputs(work.resolve(), make=not args.report_only)
    else:
        teacher, data = args.teacher or TEACHER, args.data or DATA
        check_inputs(teacher=teacher, data=data)
    overrides, teacher_uri = pipeline_overrides(data=data, tiny=args.tiny, extra=args.overrides), f"diffusers:{teacher}"
    weights = load_config(preset=PRESET, overrides=overrides).eval.guidance_weights
    if args.grid_w is not None and args.grid_w not in weights:
        _bad(f"--grid-w {args.grid_w:g}: not one of eval.guidance_weights {list(weights)}")
    if not args.report_only:
        run_pipelines({"distilled": pipeline_command(preset=PRESET, work=work, overrides=overrides,
                                                     teacher_uri=teacher_uri)}, log_dir=work.resolve() / "logs")
    command = report_command(work=str(work), teacher=args.teacher, data=args.data, tiny=args.tiny, extra=args.overrides)
    readme = None if args.no_readme or args.tiny else REPO / "README.md"
    summary = build_report(preset=PRESET, work=work, out=out, overrides=overrides, teacher_uri=teacher_uri,
                           readme=readme, report_command=command, grid_w=args.grid_w)
    for c in summary["targets"]:
        print(f"{'met ' if c['met'] else 'MISS'}  w={c['w']:g} {c['target']}: {c['distilled']} vs {c['teacher_ddim']}")
    print(f"wrote {out}/results.csv, results.json, RESULTS.md, samples.png")


if __name__ == "__main__":
    main()

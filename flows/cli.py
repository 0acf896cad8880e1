"""The ``pd`` command line: run a pipeline or a sweep of them, sample, evaluate, list presets, show a pipeline's table.

Errors are one line on stderr, credentials in URLs redacted: exit 2 for bad arguments or config
(checked before anything heavy is imported, see :mod:`flows.cli_args`), 1 for failures at run time.
Set PD_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from flows.cli_args import (
    BadArgument,
    check_model,
    check_out,
    check_prompts,
    check_sampling,
    check_uri,
    guidance_weight,
    restart_round,
)
from pd_core.config.secrets import redact_text
from pd_core.malloc_env import reexec_with_malloc_tunables
from tasks.env import offline_environment

if TYPE_CHECKING:
    from tasks.prefect_server import EmbeddedServer

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """Bad arguments: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_config_args(p: argparse.ArgumentParser, *, preset_default: str | None = "smoke") -> None:
    p.add_argument("--preset", default=preset_default, help="named preset (see `pd presets`)")
    p.add_argument("--config", dest="config_path", help="YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set distill.lr=1e-4 (repeatable)")
    p.add_argument("--name", help="pipeline name (checkpoints live under pipelines/NAME)")
    p.add_argument("--storage", help="checkpoint store root: a path or fsspec URL (s3://bucket/prefix)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under ./.pd)")


def _display_scale(text: str) -> int:
    """``--scale``: an integer from 1 to pd_core.images.MAX_DISPLAY_SCALE (32)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 32:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to 32, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pd", description="Progressive distillation pipeline (Salimans & Ho, 2022).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the whole pipeline: teacher, every round, evaluation, report")
    _add_config_args(run)
    run.add_argument("--teacher-uri", help="import this teacher instead of training one: a checkpoint folder URI, "
                                           "or diffusers:<folder or URL> (a UNet2DModel + its scheduler config)")
    run.add_argument("--restart-from", type=restart_round, metavar="N",
                     help="retrain round N and every later round, replacing their checkpoints (0 or 'teacher': "
                          "the teacher too); what comes before N is kept as it is")

    sweep = sub.add_parser("sweep", help="run one pipeline per point of a grid of overrides and compare them in MLflow")
    _add_config_args(sweep)
    sweep.set_defaults(name="sweep")
    sweep.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                       help="a config field and the values it takes, e.g. --grid distill.lr=1e-4,3e-4 (repeatable; "
                            "the points are every combination; values holding commas go in --grid-file)")
    sweep.add_argument("--grid-file", help="YAML file: grid: {FIELD: [VALUES]}, optionally exclude: [{FIELD: VALUE}]")
    sweep.add_argument("--points-as", choices=("auto", "subflows", "deployments"), default="auto",
                       help="auto: runs of the pd-distill deployment on a standing Prefect server, subflows one "
                            "after another on the embedded one")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print the points, their overrides and which share a teacher; run nothing")

    sample = sub.add_parser("sample", help="draw samples from a checkpoint or an MLflow model into a PNG grid")
    sample.add_argument("--model", required=True,
                        help="checkpoint folder URI (as `pd run` prints) or models:/NAME@ALIAS")
    sample.add_argument("--steps", type=int, help="sampling steps (default: the steps the model was distilled for)")
    sample.add_argument("--num", type=int, default=64, help="number of images (at most 100000)")
    sample.add_argument("--out", default="samples.png", help="output PNG (path or fsspec URL), written atomically")
    sample.add_argument("--scale", type=_display_scale, default=None,
                        help="enlarge every sample N times (nearest neighbour, 1-32; default: the smallest N that "
                             "makes the grid at least 512 px wide)")
    sample.add_argument("--sampler", choices=("ddim", "stochastic", "two-step", "heun"), default="ddim",
                        help="two-step: a 2/N DDIM step then a stochastic step back (Meng et al.), N calls")
    sample.add_argument("--gamma", type=float, default=0.3, help="variance interpolation of the stochastic sampler")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, help="images per batch (default: min(256, --num))")
    sample.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    sample.add_argument("--throughput", action="store_true", help="also time sampling and print images/s")
    sample.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ URIs (default: $MLFLOW_TRACKING_URI, "
                                               "else the sqlite file `pd run` uses)")
    sample.add_argument("--label", type=int, help="class-conditional models: the class of every image "
                                                  "(default: image i is class i mod K, one class per column)")
    sample.add_argument("--guidance", type=guidance_weight, help="class-conditional and text-to-image models: the "
                                                                  "guidance weight w = guidance_scale - 1 (default 0)")
    sample.add_argument("--prompt", action="append", help="text-to-image models: a prompt (repeat for more); one "
                                                          "grid row of --num images per prompt")

    ev = sub.add_parser("eval", help="evaluate one checkpoint at a step count with the config's metrics")
    _add_config_args(ev)
    ev.add_argument("--model", required=True,
                    help="checkpoint folder URI or models:/NAME@ALIAS, runs:/RUN/sampler (caches go to the store of "
                         "the checkpoint's pipeline, or --storage)")
    ev.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    ev.add_argument("--sampler", choices=("ddim", "stochastic"), default="ddim")
    ev.add_argument("--gamma", type=float, default=0.3)
    ev.add_argument("--guidance", type=guidance_weight,
                    help="class-conditional models: the guidance weight w (default 0)")

    export = sub.add_parser("export", help="write a model's sampler as a diffusers folder or one ONNX graph")
    export.add_argument("--model", required=True,
                        help="checkpoint folder URI (as `pd run` prints) or models:/NAME@ALIAS")
    export.add_argument("--format", dest="fmt", required=True, choices=("diffusers", "onnx"),
                        help="diffusers: a folder UNet2DModel.from_pretrained loads (students of diffusers teachers; "
                             "a StableDiffusionPipeline folder for students of text-to-image teachers); "
                             "onnx: the whole N-step sampler, noise in, image out")
    export.add_argument("--out", required=True, help="new output folder (diffusers) or .onnx file (onnx)")
    export.add_argument("--steps", type=int, help="sampling steps (default: the steps the model was distilled for)")
    export.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ URIs")

    sub.add_parser("presets", help="list the shipped presets")

    show = sub.add_parser("show", help="print a pipeline's checkpoints and quality table from the store")
    show.add_argument("pipeline", help="pipeline name")
    show.add_argument("--storage", help="checkpoint store root (default: ./.pd/store or $PD_HOME/store)")

    cfg = sub.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(cfg)
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # One line per event, not per request; botocore says "Found credentials in environment variables" at INFO.
    for noisy in ("httpx", "httpcore", "alembic", "mlflow.store.db.utils", "mlflow.pyfunc",
                  "mlflow.store.model_registry.abstract_store", "botocore", "aiobotocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # An MLflow outage is reported once by the tracker; urllib3 would add a line per retried request.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


class _NoTracebackFormatter(logging.Formatter):
    """Formats like ``inner`` but without exception text: the terminal gets one line per failure.

    The record itself is left intact, so Prefect's API handler still sends the full traceback to
    the run's logs in the UI.
    """

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _console_without_tracebacks() -> None:
    """Prefect's console handlers print flow/task failures with tracebacks: keep only the message there."""
    import prefect.logging.configuration  # noqa: F401  (Prefect configures its handlers on import)

    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                       if n.startswith("prefect")]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler.formatter, _NoTracebackFormatter):
                handler.setFormatter(_NoTracebackFormatter(handler.formatter))


def cmd_presets(_: argparse.Namespace) -> int:
    from pd_core.config import list_presets

    for name, line in list_presets().items():
        print(f"{name:16s} {line}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from pd_core.config import to_yaml
    from tasks.common import resolve_config

    cfg = resolve_config(preset=args.preset, config_path=args.config_path, overrides=args.overrides, name=args.name,
                         storage=args.storage, tracking_uri=args.tracking_uri)
    print(to_yaml(cfg), end="")
    return 0


def start_prefect_and_warm_up(cfg) -> EmbeddedServer | None:
    """Start Prefect's temporary server now (unless an API is set) and use its start-up time.

    The server starts on another core while this process imports Prefect, MLflow and torch and does
    the once-per-process work a training run needs anyway (:func:`tasks.common.warm_up_steps`).
    Returns the attached server, or None when Prefect uses a standing server or starts its own (then
    nothing is warmed: there is no start to overlap).
    """
    from tasks.common import warm_up_steps
    from tasks.prefect_server import spawn

    server = spawn()  # before Prefect is imported: it reads PREFECT_API_URL once
    import flows.pipeline  # noqa: F401  (Prefect, MLflow: while the server starts)

    if server is None:
        return None
    for step in warm_up_steps(cfg):
        try:
            step()
        except Exception:  # noqa: BLE001 - the flow does this work again and reports a failure its own way
            logging.getLogger("pd_core.prefect_server").debug("warm-up step failed", exc_info=True)
    return server if server.attach() else None


def _api_watch(server: EmbeddedServer | None) -> contextlib.AbstractContextManager:
    """Stops the run with one line once its Prefect API (embedded or standing) stops answering."""
    from prefect.settings import get_current_settings

    from tasks.prefect_watch import watch_api

    watch = watch_api(embedded_process=server.process if server else None,
                      api_url=server.api_url if server else get_current_settings().api.url)
    return watch or contextlib.nullcontext()


def cmd_run(args: argparse.Namespace) -> int:
    from tasks.common import resolve_config

    # Validate before Prefect starts, so a bad config costs no server start and exits 2.
    cfg = resolve_config(preset=args.preset, config_path=args.config_path, overrides=args.overrides, name=args.name,
                         storage=args.storage, tracking_uri=args.tracking_uri, teacher_uri=args.teacher_uri,
                         restart_from=args.restart_from)
    if (cfg.pipeline.teacher_uri or "").startswith("diffusers:"):
        from pd_core.interop.diffusers_folder import preflight
        from pd_core.interop.sd_folder import is_text_to_image_folder, preflight_text_to_image

        # the folder, its configs, the step count and image size; JSON only, before Prefect starts
        text = cfg.data.name == "captions" or is_text_to_image_folder(
            cfg.pipeline.teacher_uri, storage_options=dict(cfg.storage.storage_options))
        if text:
            preflight_text_to_image(cfg)
            from pd_core.text_to_image import caption_data_warning, preflight_caption_data

            preflight_caption_data(cfg)
            if warning := caption_data_warning(cfg):
                print(warning, file=sys.stderr)
        else:
            preflight(cfg)
    from tasks.tracking.uris import new_store_note

    if note := new_store_note(args.tracking_uri):
        print(note, file=sys.stderr)
    t0 = time.perf_counter()
    server = start_prefect_and_warm_up(cfg)  # stops at exit, after Prefect has shipped its last logs
    from flows.pipeline import distillation_pipeline

    if not os.environ.get("PD_DEBUG"):
        _console_without_tracebacks()
    with server.flow_settings() if server else contextlib.nullcontext(), _api_watch(server):
        result = distillation_pipeline(preset=args.preset, overrides=args.overrides, name=args.name,
                                       teacher_uri=args.teacher_uri, storage=args.storage,
                                       tracking_uri=args.tracking_uri, config_path=args.config_path,
                                       restart_from=args.restart_from)
    print()
    print(f"pipeline {cfg.pipeline.name} finished in {time.perf_counter() - t0:.1f}s")
    print(f"  teacher     {result.teacher.uri}")
    for student in result.rounds:
        label = f"{student.steps} step" + ("" if student.steps == 1 else "s")
        print(f"  {label:>10s}  {student.uri}")
    if result.prefect_run:  # the embedded server ends with this command: its runs are gone, so no link to them
        where = f"  {result.prefect_url}" if server is None and result.prefect_url else \
            " (on the temporary Prefect server this command started; with PREFECT_API_URL set: a link to it)"
        print(f"  Prefect     {result.prefect_run}{where}")
    print(f"  MLflow      {result.report.mlflow_link}")
    if result.report.mlflow_view:
        print(f"  all runs    {result.report.mlflow_view}")
    if result.report.mlflow_compare:
        print(f"  compare     {result.report.mlflow_compare}")
    if result.report.report_uri:
        print(f"  report      {result.report.report_uri}")
    if result.report.table:
        print()
        print(result.report.table)
    for line in result.report.warnings:
        print(f"warning: {line}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from flows.sweep_grid import (
        check_sweep_name,
        grid_points,
        merge_grids,
        parse_grid_args,
        read_grid_file,
        teacher_leaders,
    )

    check_uri("--storage", args.storage)
    check_uri("--tracking-uri", args.tracking_uri, storage=False)
    name = check_sweep_name(args.name)
    file_grid, exclude = read_grid_file(args.grid_file) if args.grid_file else ({}, [])
    grid = merge_grids(parse_grid_args(args.grid), file_grid)
    points = grid_points(name, grid, exclude=exclude)
    from tasks.common import resolve_config

    # Every point's config, before Prefect starts: a bad field or value costs no server start and exits 2.
    configs = [resolve_config(preset=args.preset, config_path=args.config_path, overrides=[*args.overrides,
                              *p.overrides()], name=p.name, storage=args.storage, tracking_uri=args.tracking_uri)
               for p in points]
    if args.dry_run:
        leaders = teacher_leaders({p.name: c for p, c in zip(points, configs, strict=True)})
        for point in points:
            shared = "" if leaders[point.name] == point.name else f"  (shares the teacher of {leaders[point.name]})"
            print(f"{point.name}: {' '.join(point.overrides())}{shared}")
        print(f"{len(points)} points, {len(set(leaders.values()))} teacher(s)")
        return 0
    t0 = time.perf_counter()
    server = start_prefect_and_warm_up(configs[0])
    from flows.sweep import sweep_flow

    if not os.environ.get("PD_DEBUG"):
        _console_without_tracebacks()
    with server.flow_settings() if server else contextlib.nullcontext():
        result = sweep_flow(grid=grid, name=name, preset=args.preset, exclude=exclude, overrides=args.overrides,
                            storage=args.storage, tracking_uri=args.tracking_uri, config_path=args.config_path,
                            points_as=args.points_as)
    print()
    print(f"sweep {name}: {len(points)} points finished in {time.perf_counter() - t0:.1f}s")
    for point, leader in result.teachers.items():
        trained = result.trained.get(point, -1)
        what = "reused everything" if trained == 0 else f"trained {trained} checkpoint(s)" if trained > 0 else "ran"
        shared = "" if leader == point else f", shares the teacher of {leader}"
        print(f"  {point}: {what}{shared}")
    if result.report:
        print(f"  MLflow      {result.report.mlflow_link}")
        if result.report.mlflow_view:
            print(f"  sweep view  {result.report.mlflow_view}")
        print(f"  table       {result.report.table_uri}")
        print()
        print(result.report.table)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    batch_size = args.batch_size if args.batch_size is not None else max(1, min(256, args.num))
    check_sampling(num=args.num, steps=args.steps, batch_size=batch_size, gamma=args.gamma, seed=args.seed,
                   guidance=args.guidance, label=args.label)
    check_prompts(args.prompt, label=args.label, sampler=args.sampler)
    check_uri("--tracking-uri", args.tracking_uri, storage=False)
    check_out(args.out)
    check_model(args.model)
    args.batch_size = batch_size
    from flows.sampling import sample_to_grid

    out = sample_to_grid(model=args.model, steps=args.steps, num=args.num, out=args.out, sampler=args.sampler,
                         gamma=args.gamma, seed=args.seed, batch_size=args.batch_size, device=args.device,
                         throughput=args.throughput, tracking_uri=args.tracking_uri, scale=args.scale,
                         label=args.label, guidance=args.guidance, prompts=args.prompt)
    print(out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_sampling(num=None, steps=args.steps, batch_size=None, gamma=None, seed=None)
    check_uri("--tracking-uri", args.tracking_uri, storage=False)
    check_model(args.model)
    from flows.export import export_model
    from pd_core.export.files import ExportError
    from pd_core.interop.diffusers_folder import DiffusersImportError

    try:
        print(export_model(model=args.model, fmt=args.fmt, out=args.out, steps=args.steps,
                           tracking_uri=args.tracking_uri))
    except (ExportError, DiffusersImportError) as err:  # bad arguments: exit 2
        raise UsageError(str(err)) from None
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    check_sampling(num=None, steps=args.steps, batch_size=None, gamma=args.gamma, seed=None, guidance=args.guidance)
    check_uri("--storage", args.storage)
    check_uri("--tracking-uri", args.tracking_uri, storage=False)
    check_model(args.model)
    from tasks.common import resolve_config

    cfg = resolve_config(preset=args.preset, config_path=args.config_path, overrides=args.overrides, name=args.name,
                         storage=args.storage, tracking_uri=args.tracking_uri)
    from flows.sampling import evaluate_model_cli

    print(evaluate_model_cli(cfg, model=args.model, steps=args.steps, sampler=args.sampler, gamma=args.gamma,
                             storage=args.storage, guidance=args.guidance))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    check_uri("--storage", args.storage)
    from flows.sampling import show_pipeline

    print(show_pipeline(args.pipeline, storage=args.storage))
    return 0


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "sample": cmd_sample, "eval": cmd_eval, "export": cmd_export,
            "presets": cmd_presets, "show": cmd_show, "config": cmd_config}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed arguments; an unknown option before the command is named as such (not "command required")."""
    try:
        return build_parser().parse_args(argv)
    except UsageError as err:
        given = list(sys.argv[1:] if argv is None else argv)
        unknown = [a for a in given if a.startswith("-") and a not in ("-h", "--help")]
        if "required: command" in str(err) and unknown:
            raise UsageError(f"pd: unrecognized arguments: {' '.join(unknown)} (see pd --help)") from None
        raise


def _print_error(err: BaseException) -> None:
    text = str(err).strip()
    message = text.splitlines()[0] if text else type(err).__name__
    print(f"error: {redact_text(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the `pd` command itself (not a call from Python): glibc reads its tunables only at start
        reexec_with_malloc_tunables()
    offline_environment()
    _setup_logging()
    from pd_core.config import ConfigError

    try:
        args = _parse(argv)
        return COMMANDS[args.command](args)
    except (UsageError, ConfigError, BadArgument) as err:
        _print_error(err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line; the traceback only on request
        if os.environ.get("PD_DEBUG"):
            raise
        _print_error(err)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

"""Copy a finished GPU run (the --out folder of benchmarks.gpu.run) into the repository's results.

    python -m benchmarks.gpu.merge OUT                # into this checkout
    python -m benchmarks.gpu.merge OUT --repo ROOT    # into another checkout (or a copy, to look first)

Writes, from OUT's speed.csv, quality.csv, results.json and figures:
- benchmarks/speed/results.csv: the speed rows (a row replaces the one with the same benchmark and device);
- benchmarks/quality/results.csv: the rows of the run's preset (they replace that preset's rows; the
  other presets' rows stay, in the file's column order);
- benchmarks/gpu/: results.json, quality_vs_steps.png, samples.png, teacher_<N>_steps.png, and
  RESULTS.md (generated; from its ``## Notes`` heading on, the hand-written part is kept);
- README.md: the block between ``<!-- gpu:start -->`` and ``<!-- gpu:end -->``.
A tiny (CPU) run is refused unless --allow-tiny (which exists to check this command itself), and so
is a run whose parts all failed. Exit status 2 with one line for a bad OUT or repository.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pandas as pd

from benchmarks.gpu import report
from benchmarks.gpu.quality import COLUMNS as QUALITY_COLUMNS
from benchmarks.quality.report_text import replace_block, with_notes
from benchmarks.speed.common import write_rows

REPO = Path(__file__).resolve().parents[2]
README_START, README_END = "<!-- gpu:start -->", "<!-- gpu:end -->"
FIGURES = ("quality_vs_steps.png", "samples.png")


class MergeError(ValueError):
    """OUT or the repository cannot be merged as they are (one line, with the fix)."""


def read_summary(out: Path, *, allow_tiny: bool) -> dict:
    """results.json of a run that may be merged."""
    path = out / "results.json"
    if not path.is_file():
        raise MergeError(f"{path} does not exist; give the --out folder of a finished benchmarks.gpu.run")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MergeError(f"{path} is not valid JSON ({exc}); the run was cut off before writing it") from None
    if summary.get("tiny") and not allow_tiny:
        raise MergeError(f"{path} is from a --tiny CPU run; merge only a GPU run's results (or pass --allow-tiny "
                         "to check the merge itself)")
    if not any(p.get("status") == "ok" for p in summary.get("parts", {}).values()):
        raise MergeError(f"{path}: no part of the run finished ({summary.get('parts')}); rerun it")
    return summary


def merge_speed(out: Path, repo: Path, *, summary: dict) -> int:
    """The run's speed rows into benchmarks/speed/results.csv; the number of rows merged."""
    path = out / "speed.csv"
    if summary["parts"].get("speed", {}).get("status") != "ok" or not path.is_file():
        return 0
    rows = pd.read_csv(path, dtype=str).to_dict("records")
    write_rows(rows, path=repo / "benchmarks" / "speed" / "results.csv")
    return len(rows)


def merge_quality(out: Path, repo: Path, *, summary: dict) -> int:
    """The run's rows into benchmarks/quality/results.csv, replacing its preset's rows; the number merged."""
    path = out / "quality.csv"
    if summary["parts"].get("quality", {}).get("status") != "ok" or not path.is_file():
        return 0
    new = pd.read_csv(path, dtype={"steps": "Int64", "n_samples": "Int64"})
    target = repo / "benchmarks" / "quality" / "results.csv"
    old = pd.read_csv(target, dtype={"steps": "Int64", "n_samples": "Int64"}) if target.is_file() else \
        pd.DataFrame(columns=QUALITY_COLUMNS)
    columns = list(old.columns) if len(old.columns) else QUALITY_COLUMNS
    missing = [c for c in columns if c not in new.columns]
    if missing:
        raise MergeError(f"{path} lacks the columns {missing} of {target}; the two formats differ")
    kept = old[~old["preset"].isin(set(new["preset"]))]
    pd.concat([kept, new[columns]], ignore_index=True).to_csv(target, index=False)
    return len(new)


def readme_with_block(text: str, block: str, *, readme: Path) -> str:
    """The README text with the block between its gpu markers replaced (the markers must exist)."""
    replaced = replace_block(text, block, start=README_START, end=README_END)
    if replaced is None:
        raise MergeError(f"{readme} lacks the markers {README_START} / {README_END}; add them where the GPU "
                         "paragraph goes")
    return replaced


def merge(out: Path, repo: Path, *, allow_tiny: bool = False) -> list[str]:
    """Everything the module docstring lists; the repository paths written. Checks come before any write."""
    summary = read_summary(out, allow_tiny=allow_tiny)
    readme = repo / "README.md"
    if not readme.is_file():
        raise MergeError(f"{repo} has no README.md; --repo must be the repository's root")
    quality_path = out / "quality.csv"
    quality = pd.read_csv(quality_path, dtype={"steps": "Int64", "n_samples": "Int64"}) \
        if quality_path.is_file() else pd.DataFrame(columns=QUALITY_COLUMNS)
    new_readme = readme_with_block(readme.read_text(), report.readme_block(summary, quality=quality), readme=readme)
    written = []
    if merge_quality(out, repo, summary=summary):
        written.append("benchmarks/quality/results.csv")
    if merge_speed(out, repo, summary=summary):
        written.append("benchmarks/speed/results.csv")
    gpu = repo / "benchmarks" / "gpu"
    gpu.mkdir(parents=True, exist_ok=True)
    for f in [*FIGURES, *(p.name for p in out.glob("teacher_*_steps.png")), "results.json"]:
        if (out / f).is_file():
            shutil.copyfile(out / f, gpu / f)
            written.append(f"benchmarks/gpu/{f}")
    results_md = gpu / "RESULTS.md"
    old = results_md.read_text() if results_md.is_file() else ""
    generated = report.results_markdown(summary, quality=quality, units=summary.get("speed_units", {}))
    results_md.write_text(with_notes(generated, old=old))
    readme.write_text(new_readme)
    return [*written, "benchmarks/gpu/RESULTS.md", "README.md"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the --out folder of a finished benchmarks.gpu.run")
    p.add_argument("--repo", type=Path, default=REPO, help="repository root to write into (default: this one)")
    p.add_argument("--allow-tiny", action="store_true", help="merge a --tiny run (to check this command only)")
    args = p.parse_args(argv)
    try:
        written = merge(args.out, args.repo, allow_tiny=args.allow_tiny)
    except MergeError as exc:
        print(f"python -m benchmarks.gpu.merge: error: {exc}", file=sys.stderr)
        return 2
    print("merged into " + ", ".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``pd sample`` / ``pd eval`` arguments: bounds and exit codes as for ``pd run`` (2 and one line), checked
before anything heavy is imported; ``--out`` checked and written atomically; ``pd --bogus`` named."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tests.faults.helpers import _cfg, _copy_of, log_lines, run_cli

# A refusal that waits on something (a network retry, a server start) takes minutes; a prompt one takes well under a
# second on an idle machine. The bound tells the two apart on a loaded machine too: it is not a speed target.
HANG_S = 60


@pytest.fixture
def student_uri(template: Path, tmp_path: Path) -> str:
    """The template's 4-step round-1 student, in a private copy of its store."""
    _, student = _copy_of(template, tmp_path, _cfg("faults"))
    return student.uri


BAD_SAMPLE_ARGS = [
    (["--num", "0"], "--num must be between 1 and 100000, got 0"),
    (["--num", "-3"], "--num must be between 1 and 100000, got -3"),
    (["--num", "1000000000"], "--num must be between 1 and 100000, got 1000000000"),
    (["--steps", "0"], "--steps must be between 1 and 10000, got 0"),
    (["--steps", "-1"], "--steps must be between 1 and 10000, got -1"),
    (["--steps", "100000000"], "--steps must be between 1 and 10000, got 100000000"),
    (["--batch-size", "0"], "--batch-size must be between 1 and 64, got 0"),
    (["--batch-size", "-1"], "--batch-size must be between 1 and 64, got -1"),
    (["--num", "8", "--batch-size", "9"], "--batch-size must be between 1 and 8, got 9"),
    (["--gamma", "1.5", "--sampler", "stochastic"], "--gamma must be between 0 and 1, got 1.5"),
    (["--seed", "-1"], "--seed must be between 0 and 9223372036854775807, got -1"),
    (["--out", "grid.jpg"], "--out grid.jpg must end in .png"),
    (["--out", "no/such/folder/grid.png"], "does not exist"),
]


@pytest.mark.parametrize("args, expected", BAD_SAMPLE_ARGS, ids=[" ".join(a) for a, _ in BAD_SAMPLE_ARGS])
def test_bad_sample_arguments_exit_2_with_one_line_at_once(cli_home: Path, student_uri: str, args: list[str],
                                                           expected: str) -> None:
    t0 = time.perf_counter()
    rc, out, err = run_cli(["sample", "--model", student_uri, *args])
    assert rc == 2 and out == "", (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert time.perf_counter() - t0 < HANG_S
    assert not Path("grid.jpg").exists() and not Path("samples.png").exists()


@pytest.mark.parametrize("args, expected", [
    (["--steps", "0"], "--steps must be between 1 and 10000, got 0"),
    (["--steps", "-1"], "--steps must be between 1 and 10000, got -1"),
    (["--steps", "100000000"], "--steps must be between 1 and 10000"),
    (["--gamma", "-0.5"], "--gamma must be between 0 and 1"),
])
def test_bad_eval_arguments_exit_2_with_one_line(cli_home: Path, student_uri: str, args: list[str],
                                                 expected: str) -> None:
    rc, out, err = run_cli(["eval", "--model", student_uri, *args])
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and expected in err, (rc, err)


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_a_model_uri_that_is_not_a_checkpoint_fails_in_seconds(cli_home: Path, tmp_path: Path, command: str) -> None:
    for model, expected in [(str(tmp_path / "nothing-here"), "no checkpoint there"),
                            ("nosuchproto://bucket/x", "unknown protocol 'nosuchproto'"),
                            ("models:/", "is not an MLflow model URI")]:
        t0 = time.perf_counter()
        rc, _, err = run_cli([command, "--model", model])
        assert rc == 2 and len(err.splitlines()) == 1 and expected in err, (model, rc, err)
        assert time.perf_counter() - t0 < HANG_S, model


def test_other_steps_than_a_student_was_distilled_for_warn_and_the_grid_is_written_atomically(
        cli_home: Path, student_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.sampling

    out = tmp_path / "grid.png"
    writes: list[str] = []
    real_replace = flows.sampling.os.replace

    def watched_replace(src: str, dst: str) -> None:  # the whole PNG is written before it gets its name
        data = Path(src).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82"), "partial PNG renamed"
        writes.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(flows.sampling.os, "replace", watched_replace)
    caplog.set_level(logging.INFO)
    rc, stdout, err = run_cli(["sample", "--model", student_uri, "--steps", "3", "--num", "4", "--out", str(out)])
    assert rc == 0, err
    assert stdout.strip() == f"wrote 4 samples (ddim, 3 steps) to {out}"
    warnings = log_lines(caplog.records, "", level=logging.WARNING)
    assert warnings == ["--steps 3: this student was distilled to sample in 4 step(s); other step counts are "
                        "allowed but rarely what you want"], warnings
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(writes) == 1 and writes[0].startswith(".tmp-")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")) == []
    caplog.clear()
    rc, _, err = run_cli(["sample", "--model", student_uri, "--num", "4", "--out", str(out)])  # its own 4 steps
    assert rc == 0 and not [r for r in caplog.records if r.levelno == logging.WARNING], err
    assert len(writes) == 2 and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_an_unknown_option_is_named(cli_home: Path) -> None:
    for argv in (["--bogus"], ["--bogus", "run"], ["run", "--bogus"], ["sample", "--bogus", "--model", "x"]):
        rc, out, err = run_cli(argv)
        assert rc == 2 and out == "" and len(err.splitlines()) == 1, (argv, err)
        assert "unrecognized arguments: --bogus" in err, (argv, err)


def test_an_unknown_storage_protocol_exits_2_before_anything_is_created(cli_home: Path) -> None:
    t0 = time.perf_counter()
    rc, out, err = run_cli(["run", "--storage", "nosuchproto://x"])
    assert rc == 2 and out == "" and len(err.splitlines()) == 1, err
    assert "storage.root has an unknown protocol 'nosuchproto'" in err
    assert time.perf_counter() - t0 < HANG_S
    assert not cli_home.exists() or not any(cli_home.iterdir()), list(cli_home.rglob("*"))  # no MLflow db, no store
    assert not any(Path.cwd().iterdir())

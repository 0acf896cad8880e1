"""``pd config`` / ``pd run`` with bad input (in-process flows.cli.main): exit 2, one line, no traceback."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pd_core.config import flatten, load_config


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    home = tmp_path_factory.mktemp("cli-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PD_HOME", str(home))
        mp.setenv("PREFECT_HOME", str(home / "prefect"))
        hygiene = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_EXTRA_LOGGERS": "pd_core"}
        for name, value in hygiene.items():
            mp.setenv(name, value)  # prepare_environment's setdefaults, undone after the module
        mp.delenv("PD_STORAGE", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("PD_DEBUG", raising=False)
        yield


def _cli(argv: list[str]) -> tuple[int, str, str]:
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse --help / version: not an error path
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


FIELDS = sorted(flatten(load_config(preset="smoke")))
_keys = st.one_of(st.sampled_from(FIELDS),
                  st.sampled_from(["model.chh", "distill", "model", "nosuch.field", "teacher.updates.x", "Distill.lr",
                                   "storage.storage_options.key", "storage.storage_options.secret_access_key"]),
                  st.text(max_size=12))
_values = st.one_of(st.sampled_from(["-1", "0", "1", "1.5", "nan", ".inf", "-.inf", "1e999", "null", "true", "[]",
                                     "[1,", "{a: 1}", "{", "'", "!!python/object:os.system", "&a [*a]", "0x10", "1_000",
                                     "s3://AKIA:pw@bucket/x", "\x00", "é", "a\nb"]),
                    st.text(max_size=12))
_items = st.one_of(st.builds(lambda k, v: f"{k}={v}", _keys, _values), st.text(max_size=24))
_option = st.one_of(
    st.tuples(st.sampled_from(["--set"]), _items),
    st.tuples(st.sampled_from(["--preset"]), st.one_of(st.sampled_from(["smoke", "smok", "../smoke", "", "fmnist-cpu"]),
                                                         st.text(max_size=10))),
    st.tuples(st.sampled_from(["--name"]), st.one_of(st.sampled_from(["ok-name", "../up", "a/b", "x" * 101, " "]),
                                                       st.text(max_size=12))),
    st.tuples(st.sampled_from(["--storage"]), st.sampled_from(["s3://AKIAX:secret@bucket/p", "   ", "relative/store"])),
    st.tuples(st.sampled_from(["--tracking-uri"]), st.sampled_from(["http://u:pw@mlflow:5000", "postgresql://a:b@db/m",
                                                                    "sqlite:///x.db"])),
    st.tuples(st.sampled_from(["--config"]), st.sampled_from(["/nonexistent/pd.yaml", "memory://pd-no-such.yaml"])),
    st.tuples(st.sampled_from(["--bogus", "-x", "--set", "--name"]), st.sampled_from(["-q", "--set", "1", "--bogus"])),
)
_argv = st.lists(_option, min_size=1, max_size=3).map(lambda opts: [a for opt in opts for a in opt])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=_argv)
def test_cli_bad_input_exits_2_with_one_line(cli_env: None, argv: list[str]) -> None:
    assume(not {"-h", "--help"} & set(argv))  # help is not an error
    rc, out, err = _cli(["config", *argv])
    assert "Traceback" not in err and "Traceback" not in out
    if rc == 0:  # valid after all: the resolved config is printed and reloads
        assert err == "" and isinstance(yaml.safe_load(out), dict)
        return
    assert rc == 2, (rc, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and out == "", err
    for password in ("AKIAX:secret", "u:pw@mlflow", "a:b@db"):  # URL passwords are refused, never echoed
        assert password not in err
    # `pd run` refuses exactly the same input, with the same line, before starting anything
    rc_run, out_run, err_run = _cli(["run", *argv])
    assert (rc_run, out_run, err_run.replace("pd run", "pd config")) == (2, "", err)


KNOWN_FIELD = re.compile("|".join(re.escape(f) for f in sorted({*FIELDS, *[f.split(".")[0] for f in FIELDS]},
                                                                 key=len, reverse=True)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(FIELDS), value=_values)
def test_cli_bad_value_names_the_field(cli_env: None, key: str, value: str) -> None:
    rc, out, err = _cli(["config", "--set", f"{key}={value}"])
    assert rc in (0, 2) and "Traceback" not in err
    if rc == 2:
        line = err.strip()
        assert "\n" not in line and line.startswith("error: ")
        assert key in line or KNOWN_FIELD.search(line) or "YAML" in line, line  # names a field (or the YAML problem)

"""Credentials in any URI the CLI or the config takes: refused, and never printed, stored or sent.

Userinfo (``user:password@``) and credential query parameters (``?token=``, presigned
``X-Amz-Signature``...) are refused in every URI field, nested storage options included; error
lines, including the CLI's printing of any failure, redact them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pd_core.config import ConfigError, load_config
from tests.faults.helpers import run_cli

SECRET = "pd-SeCrEt-7Qz"  # distinctive: a scan for it means something
KEY_ID = "AKIAPDSECRETSCAN9"

SECRET_URIS = [f"s3://{KEY_ID}:{SECRET}@bucket/p", f"https://mlflow.example/api?token={SECRET}",
               f"https://bucket.s3.amazonaws.com/x?X-Amz-Credential={KEY_ID}&X-Amz-Signature={SECRET}",
               f"https://acct.blob.core.windows.net/c/x?sv=2022&sig={SECRET}", f"http://user:{SECRET}@host:9000"]


def _assert_refused_without_the_secret(rc: int, out: str, err: str) -> None:
    assert rc == 2 and out == "", (rc, out, err)
    assert len(err.splitlines()) == 1 and "must not contain credentials" in err, err
    assert SECRET not in err and KEY_ID not in err, err


@pytest.mark.parametrize("uri", SECRET_URIS)
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_pd_sample_and_eval_refuse_a_model_uri_with_credentials_without_printing_them(cli_home: Path, command: str,
                                                                                      uri: str) -> None:
    _assert_refused_without_the_secret(*run_cli([command, "--model", uri]))


@pytest.mark.parametrize("argv", [
    ["run", "--tracking-uri", f"http://127.0.0.1:5000/?token={SECRET}"],
    ["run", "--storage", f"s3://{KEY_ID}:{SECRET}@bucket/p"],
    ["run", "--teacher-uri", f"s3://bucket/p/teacher?X-Amz-Signature={SECRET}"],
    ["run", "--storage", "s3://bucket/p", "--set",
     f"storage.storage_options={{client_kwargs: {{endpoint_url: 'http://admin:{SECRET}@127.0.0.1:9000'}}}}"],
    ["config", "--set", f"data.mirror=https://mirror.example/fmnist?access_token={SECRET}"],
    ["config", "--set", f"eval.inception_weights=https://x.example/pt_inception.pth?sig={SECRET}"],
    ["sample", "--model", "file:///tmp/x", "--tracking-uri", f"http://u:{SECRET}@mlflow:5000"],
    ["sample", "--model", "file:///tmp/x", "--out", f"s3://{KEY_ID}:{SECRET}@bucket/grid.png"],
    ["eval", "--model", "file:///tmp/x", "--storage", f"s3://bucket/p?token={SECRET}"],
    ["show", "smoke", "--storage", f"s3://{KEY_ID}:{SECRET}@bucket/p"],
], ids=["tracking-token", "storage-userinfo", "teacher-presigned", "nested-endpoint-userinfo", "data-mirror-token",
        "inception-sig", "sample-tracking-userinfo", "sample-out-userinfo", "eval-storage-token", "show-storage"])
def test_every_uri_option_and_field_refuses_credentials_without_printing_them(cli_home: Path,
                                                                              argv: list[str]) -> None:
    _assert_refused_without_the_secret(*run_cli(argv))
    assert not cli_home.exists() or not (cli_home / "mlflow.db").exists(), "refused before anything started"


@pytest.mark.parametrize("field", ["storage.root", "tracking.tracking_uri", "data.url", "data.mirror",
                                   "data.download_dir", "pipeline.teacher_uri", "eval.inception_weights"])
@pytest.mark.parametrize("uri", SECRET_URIS)
def test_config_url_fields_refuse_credentials(field: str, uri: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(preset="smoke", overrides=[f"{field}={uri}"])
    message = str(err.value)
    assert message.startswith(f"{field} must not contain credentials"), message
    assert SECRET not in message and KEY_ID not in message


def test_credentials_inside_nested_storage_option_values_are_refused() -> None:
    options = f"{{client_kwargs: {{endpoint_url: 'http://admin:{SECRET}@127.0.0.1:9000', region_name: us-east-1}}}}"
    with pytest.raises(ConfigError) as err:
        load_config(preset="smoke", overrides=[f"storage.storage_options={options}"])
    message = str(err.value)
    assert "storage.storage_options must not contain credentials (found client_kwargs.endpoint_url)" in message
    assert SECRET not in message
    ok = "{client_kwargs: {endpoint_url: 'http://127.0.0.1:9000'}}"
    assert load_config(preset="smoke", overrides=[f"storage.storage_options={ok}"]).storage.storage_options


def test_values_echoed_in_config_errors_are_redacted() -> None:
    with pytest.raises(ConfigError) as err:  # a list where a string belongs: the value is echoed ("got ...")
        load_config(preset="smoke", overrides=[f"tracking.tracking_uri=[http://u:{SECRET}@h, 'x?token={SECRET}']"])
    assert "must be a string, got" in str(err.value) and SECRET not in str(err.value), str(err.value)


def test_the_cli_redacts_credentials_in_any_error_it_prints(cli_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.cli

    def failing(_args: object) -> int:
        raise RuntimeError(f"cannot open s3://{KEY_ID}:{SECRET}@bucket/x nor https://h/y?token={SECRET}&a=1")

    monkeypatch.setitem(flows.cli.COMMANDS, "presets", failing)
    rc, _, err = run_cli(["presets"])
    assert rc == 1 and err == "error: cannot open s3://***@bucket/x nor https://h/y?token=***&a=1\n", err


def test_tracked_text_redacts_credential_query_parameters() -> None:
    from tasks.tracking import redact

    assert redact(f"see https://h/a?x=1&token={SECRET}") == "see https://h/a?x=1&token=***"
    assert redact(f"postgresql://user:{SECRET}@db:5432/x") == "postgresql://user:***@db:5432/x"

"""pd_core.config: presets, one-line field-naming errors, overrides, hashing, property-based bad input."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pd_core import config as C
from pd_core.config import Config, ConfigError, load_config, parse_override

PRESETS = ("smoke", "fmnist-cpu", "fmnist-gpu", "cifar10-paper")


def smoke(*overrides: str) -> Config:
    return load_config(preset="smoke", overrides=list(overrides))


def error_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        smoke(*overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------ presets

@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_validate(name: str) -> None:
    cfg = load_config(preset=name)
    assert cfg.distill.rounds()[-1][1] == cfg.distill.final_steps
    assert cfg.data.image_size % 2 ** (len(cfg.model.ch_mult) - 1) == 0
    assert C.load_config(preset=name) == cfg  # deterministic


def test_list_presets_has_descriptions() -> None:
    presets = C.list_presets()
    assert set(PRESETS) <= set(presets)
    assert all(desc and "\n" not in desc for desc in presets.values())


def test_smoke_preset_is_tiny() -> None:
    cfg = smoke()
    assert (cfg.data.name, cfg.data.image_size) == ("digits", 8)
    assert cfg.model.ch == 16 and tuple(cfg.model.ch_mult) == (1, 2) and cfg.model.num_res_blocks == 1
    assert cfg.distill.rounds() == [(8, 4), (4, 2), (2, 1)]
    assert cfg.runtime.device == "cpu"


def test_cifar10_paper_preset_matches_the_paper() -> None:
    cfg = load_config(preset="cifar10-paper")
    m, d, t = cfg.model, cfg.distill, cfg.teacher
    assert (m.ch, m.resolved_emb_ch, tuple(m.ch_mult), m.num_res_blocks) == (256, 1024, (1, 1, 1), 3)
    assert tuple(m.attn_resolutions) == (16, 8) and m.dropout == 0.2
    assert (cfg.diffusion.parameterization, cfg.diffusion.weighting) == ("x", "snr_trunc")
    assert (d.start_steps, d.batch_size, d.lr, d.updates_per_round, d.last_rounds_updates) == (
        8192, 128, 5e-5, 50_000, 100_000)
    assert (t.lr, t.warmup_steps, t.ema_decay, t.grad_clip) == (2e-4, 1000, 0.9999, 1.0)
    assert cfg.data.name == "cifar10" and cfg.data.random_flip
    assert len(d.rounds()) == 13


def test_unknown_preset_suggests() -> None:
    with pytest.raises(ConfigError, match="did you mean smoke"):
        load_config(preset="smok")


# ------------------------------------------------------------------------------------ distill schedule

def test_rounds_and_updates() -> None:
    cfg = smoke("distill.start_steps=16", "distill.final_steps=2", "distill.updates_per_round=100",
                "distill.last_rounds_updates=300")
    assert cfg.distill.rounds() == [(16, 8), (8, 4), (4, 2)]
    assert [cfg.distill.updates_for(s) for s in (8, 4, 2)] == [100, 100, 300]
    fast = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"fast": True, "fast_factor": 4})})
    assert [fast.distill.updates_for(s) for s in (8, 4, 2)] == [25, 25, 75]
    with pytest.raises(ValueError, match="student_steps"):
        cfg.distill.updates_for(1)


# ------------------------------------------------------------------------------------ errors name the field

@pytest.mark.parametrize("override, expected", [
    ("distill.start_steps=6", "distill.start_steps must be a power of two >= 2, got 6"),
    ("distill.start_steps=1", "distill.start_steps must be a power of two >= 2, got 1"),
    ("distill.final_steps=8", "distill.final_steps must be smaller than distill.start_steps (8), got 8"),
    ("distill.final_steps=3", "distill.final_steps must be a power of two >= 1, got 3"),
    ("model.chh=3", "unknown field model.chh (did you mean model.ch?)"),
    ("modle.ch=3", "unknown field modle (did you mean model?)"),
    ("distill.lr=-1", "distill.lr must be > 0"),
    ("distill.lr=.nan", "distill.lr must be a finite number"),
    ("teacher.batch_size=0", "teacher.batch_size must be >= 1, got 0"),
    ("teacher.batch_size=2.5", "teacher.batch_size must be an integer, got 2.5"),
    ("distill.fast=maybe", "distill.fast must be true or false"),
    ("data.name=cifar", "data.name must be one of"),
    ("data.image_size=7", "data.image_size must be divisible by 2^(len(model.ch_mult)-1) = 2"),
    ("model.attn_resolutions=[3]", "model.attn_resolutions must be resolutions of this U-Net [8, 4]"),
    ("model.ch_mult=[]", "model.ch_mult must have at least 1 item"),
    ("model.num_heads=5", "model.num_heads must split the 32 attention channels"),
    ("model.dropout=1.0", "model.dropout must be < 1.0"),
    ("diffusion.parameterization=eps", "diffusion.weighting must not be 'snr_trunc' with diffusion.parameterization"),
    ("diffusion.logsnr_min=30", "diffusion.logsnr_min must be smaller than diffusion.logsnr_max"),
    ("eval.kid_subset_size=201", "eval.kid_subset_size must be <= eval.num_samples (200), got 201"),
    ("eval.features=inception", "eval.inception_weights is required when eval.features is 'inception'"),
    ("eval.inception_sha256=abc", "eval.inception_sha256 must be 64 hex digits"),
    ("eval.stochastic_gammas=[0.3, 1.5]", "eval.stochastic_gammas must be coefficients in [0, 1], got 1.5"),
    ("pipeline.name=../escape", "pipeline.name must be 1-100 letters"),
    ("data.name=npz", "data.url is required for data.name 'npz'"),
    ("data.url=/tmp/x", "data.url must be null for data.name 'digits'"),
    ("data.download=true", "data.download must be false for data.name 'digits'"),
    ("teacher=5", "teacher must be a mapping of fields, got 5"),
    ("model.ch.x=1", "cannot set model.ch.x: model.ch is a value"),
])
def test_errors_name_the_field(override: str, expected: str) -> None:
    assert expected in error_of(override)


@pytest.mark.parametrize("options, found", [
    ("{key: AKIA}", "key"),
    ("{secret: x}", "secret"),
    ("{client_kwargs: {aws_secret_access_key: x}}", "client_kwargs.aws_secret_access_key"),
    ("{token: x}", "token"),
    ("{Password: x}", "Password"),
    ("{sso_credentials: x}", "sso_credentials"),
])
def test_storage_options_refuse_secrets(options: str, found: str) -> None:
    message = error_of(f"storage.storage_options={options}")
    assert message.startswith("storage.storage_options must not contain credentials")
    assert found in message and "AWS_ACCESS_KEY_ID" in message


def test_storage_options_without_secrets_are_fine() -> None:
    cfg = smoke("storage.root=s3://bucket/pd", "storage.storage_options={client_kwargs: {endpoint_url: 'http://127.0.0.1:9000'}}")
    assert cfg.storage.storage_options["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"


@pytest.mark.parametrize("override", ["tracking.tracking_uri=postgresql://u:pw@db/mlflow",
                                      "storage.root=http://user:pw@host/store"])
def test_urls_with_passwords_are_refused(override: str) -> None:
    message = error_of(override)
    assert "must not contain credentials (found a password in the URL" in message and ":pw@" not in message


def test_missing_sections_say_what_to_set() -> None:
    with pytest.raises(ConfigError) as info:
        load_config()
    assert "section data is missing: set data.name, data.image_size" in str(info.value)


def test_several_errors_fit_on_one_line() -> None:
    message = error_of("teacher.lr=0", "distill.batch_size=0", "eval.batch_size=0", "model.ch=0")
    assert "\n" not in message and "teacher.lr" in message and "(and 1 more)" in message


# ------------------------------------------------------------------------------------ overrides and files

@pytest.mark.parametrize("item, expected", [
    ("distill.lr=1e-4", ("distill.lr", 1e-4)),
    ("distill.updates_per_round=5e4", ("distill.updates_per_round", 5e4)),
    ("model.ch_mult=[1, 2, 2]", ("model.ch_mult", [1, 2, 2])),
    ("distill.grad_clip=null", ("distill.grad_clip", None)),
    ("data.url=s3://bucket/a=b", ("data.url", "s3://bucket/a=b")),
    ("  eval.enabled = false", ("eval.enabled", False)),
])
def test_parse_override(item: str, expected: tuple) -> None:
    assert parse_override(item) == expected


@pytest.mark.parametrize("item", ["distill.lr", "=3", "a..b=1", ".a=1", "a b=1", "distill.lr=[1", "x=: :"])
def test_parse_override_malformed(item: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_override(item)
    assert "\n" not in str(info.value)


def test_file_merges_over_preset_and_overrides_win(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("distill:\n  lr: 3.0e-4\n  batch_size: 32\nmodel:\n  ch: 8\n")
    cfg = load_config(preset="smoke", path=str(path), overrides=["distill.batch_size=16"])
    assert (cfg.distill.lr, cfg.distill.batch_size, cfg.model.ch) == (3e-4, 16, 8)
    assert cfg.distill.start_steps == 8  # untouched preset values survive the merge
    assert load_config(preset="smoke", overrides="distill.batch_size=16").distill.batch_size == 16  # lone string


def test_config_file_from_fsspec_url() -> None:
    url = f"memory://cfg-{uuid.uuid4().hex}/run.yaml"
    with fsspec.open(url, "w") as f:
        f.write(C.to_yaml(smoke("pipeline.name=from-memory")))
    assert load_config(path=url).pipeline.name == "from-memory"


@pytest.mark.parametrize("text, expected", [
    ("model: [1, 2\n", "is not valid YAML at line"),
    ("- a\n- b\n", "must contain a mapping of sections"),
])
def test_bad_files(tmp_path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(preset="smoke", path=str(path))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(path="/nonexistent/run.yaml")


def test_to_yaml_round_trips(tmp_path) -> None:
    cfg = load_config(preset="cifar10-paper", overrides=["storage.storage_options={anon: false}"])
    path = tmp_path / "resolved.yaml"
    path.write_text(C.to_yaml(cfg))
    assert load_config(path=str(path)) == cfg


def test_config_is_frozen() -> None:
    cfg = smoke()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.distill.lr = 1.0  # type: ignore[misc]


# ------------------------------------------------------------------------------------ hash, flatten, spec

def test_config_hash_is_stable_across_key_order(tmp_path) -> None:
    dump = smoke().model_dump(mode="json")
    reordered = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(dump.items()))}
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(dump, sort_keys=False))
    b.write_text(yaml.safe_dump(reordered, sort_keys=False))
    assert a.read_text() != b.read_text()
    ha, hb = C.config_hash(load_config(path=str(a))), C.config_hash(load_config(path=str(b)))
    assert ha == hb and len(ha) == 64
    assert C.config_hash(smoke("distill.lr=1e-3")) != ha


def test_config_hash_of_sections() -> None:
    base = smoke()
    moved = smoke("tracking.tracking_uri=http://mlflow:5000", "runtime.threads=2")
    sections = ("model", "diffusion", "data", "distill")
    assert C.config_hash(base, sections=sections) == C.config_hash(moved, sections=sections)
    assert C.config_hash(base) != C.config_hash(moved)
    with pytest.raises(ConfigError, match="sections"):
        C.config_hash(base, sections=["nope"])


def test_flatten_gives_dotted_scalars() -> None:
    flat = C.flatten(smoke("storage.storage_options={client_kwargs: {endpoint_url: x}}"))
    assert flat["distill.start_steps"] == 8
    assert flat["model.ch_mult"] == "[1, 2]"
    assert flat["data.url"] == "null"
    assert flat["storage.storage_options.client_kwargs.endpoint_url"] == "x"
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())


def test_unet_spec_from_the_config_builds_the_unet() -> None:
    import torch

    from pd_core.unet import UNet, unet_spec

    cfg = smoke()
    spec = unet_spec(cfg, in_channels=1)
    assert (spec.in_channels, spec.out_channels, spec.image_size, spec.emb_ch) == (1, 1, 8, 64)
    out = UNet(spec)(torch.zeros(2, 1, 8, 8), torch.zeros(2))
    assert out.shape == (2, 1, 8, 8)
    cfg = smoke("diffusion.parameterization=both")
    both = unet_spec(cfg, in_channels=3, dropout=0.0)
    assert both.out_channels == 6 and both.dropout == 0.0


def test_field_descriptions_cover_every_field() -> None:
    descriptions = C.field_descriptions()
    assert descriptions and all(descriptions.values()), [k for k, v in descriptions.items() if not v]
    assert set(descriptions) == set(C.flatten(smoke()))


def test_no_prefect_or_mlflow_import() -> None:
    code = ("import sys, pd_core.config, pd_core.data; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------ property-based

FIELDS = sorted(C.flatten(smoke()))
SIMPLE_NUMERIC = ["teacher.lr", "teacher.updates", "teacher.batch_size", "teacher.ema_decay", "distill.lr",
                  "distill.batch_size", "distill.updates_per_round", "eval.batch_size", "model.dropout",
                  "runtime.nproc"]
yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=6,
)
fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(st.text(max_size=40))
def test_parse_override_never_raises_anything_else(item: str) -> None:
    try:
        key, _ = parse_override(item)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert item.partition("=")[0].strip() == key


@fast
@given(st.sampled_from(FIELDS + ["model.chh", "distill", "nosuch.field"]), st.text(max_size=20))
def test_any_override_gives_config_or_one_line_error(key: str, raw: str) -> None:
    try:
        load_config(preset="smoke", overrides=[f"{key}={raw}"])
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)


@fast
@given(st.sampled_from(FIELDS), yaml_values)
def test_any_yaml_value_gives_config_or_one_line_error(key: str, value) -> None:
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    try:
        load_config(preset="smoke", overrides=[f"{key}={text}"])
    except ConfigError as exc:
        assert "\n" not in str(exc)


@fast
@given(st.sampled_from(SIMPLE_NUMERIC), yaml_values)
def test_invalid_numeric_values_name_their_field(key: str, value) -> None:
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    try:
        load_config(preset="smoke", overrides=[f"{key}={text}"])
    except ConfigError as exc:
        assert str(exc).startswith(key) or "is not valid YAML" in str(exc), str(exc)


@fast
@given(st.integers(min_value=-(2**40), max_value=2**40))
def test_start_steps_power_of_two(value: int) -> None:
    power = value >= 2 and value & (value - 1) == 0
    valid = power and value <= 2**16
    try:
        cfg = load_config(preset="smoke", overrides=[f"distill.start_steps={value}"])
    except ConfigError as exc:
        assert not valid
        assert str(exc) == (f"distill.start_steps must be at most 65536 (a power of two), got {value}" if power
                            else f"distill.start_steps must be a power of two >= 2, got {value}")
    else:
        assert valid and cfg.distill.rounds()[0] == (value, value // 2)


@fast
@given(st.integers(min_value=-64, max_value=1024))
def test_image_size_divisibility(value: int) -> None:
    try:
        cfg = load_config(preset="smoke", overrides=[f"data.image_size={value}"])
    except ConfigError as exc:
        assert str(exc).startswith("data.image_size")
        assert value < 1 or value % 2
    else:
        assert cfg.data.image_size == value and value % 2 == 0


@fast
@given(st.dictionaries(st.sampled_from(["model", "data", "teacher", "distill", "eval", "zzz", "storage"]),
                       yaml_values, max_size=4))
def test_arbitrary_trees_validate_or_raise_config_error(tree: dict) -> None:
    try:
        C.validate_config(tree)
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_the_import_preset_is_the_settings_the_your_model_benchmark_measured() -> None:
    """fmnist-import-cpu's time and quality are those of benchmarks/your_model (its config over fmnist-cpu)."""
    from pd_core.config import flatten

    preset = flatten(load_config(preset="fmnist-import-cpu"))
    config = Path(__file__).resolve().parents[1] / "benchmarks" / "your_model" / "config.yaml"
    measured = flatten(load_config(preset="fmnist-cpu", path=str(config)))
    assert {k: v for k, v in preset.items() if measured[k] != v} == {"pipeline.name": "fmnist-import-cpu"}

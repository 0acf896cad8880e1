"""pd_core.metrics: the quality table (one row per step count, best gamma, the floor) and its long format."""

from __future__ import annotations

from pd_core import metrics


def _records():
    rows = []
    for steps in (1, 2, 4):
        rows.append({"sampler": "teacher_ddim", "steps": steps, "n_samples": 1000, "seconds_per_image": 0.01 * steps,
                     "fd_fashion_mnist": 10.0 / steps, "kid_fashion_mnist": 0.1 / steps})
        for gamma, fd in ((0.1, 9.0 / steps), (0.3, 8.0 / steps)):
            rows.append({"sampler": "teacher_stochastic", "steps": steps, "gamma": gamma, "n_samples": 1000,
                         "seconds_per_image": 0.01 * steps, "fd_fashion_mnist": fd, "kid_fashion_mnist": 0.1})
        rows.append({"sampler": "distilled", "steps": steps, "n_samples": 1000, "seconds_per_image": 0.01 * steps,
                     "fd_fashion_mnist": 5.0 / steps, "kid_fashion_mnist": 0.05 / steps, "uri": "s3://x"})
    rows.append({"sampler": "floor", "steps": None, "n_samples": 1000, "fd_fashion_mnist": 0.5,
                 "kid_fashion_mnist": 0.0001})
    return rows


def test_quality_table_has_one_row_per_step_count_with_best_gamma_and_floor():
    df = metrics.quality_table(_records())
    assert df["steps"].tolist() == [1, 2, 4]
    for col in ("teacher_ddim_fd_fashion_mnist", "teacher_stochastic_fd_fashion_mnist", "teacher_stochastic_gamma",
                "distilled_fd_fashion_mnist", "distilled_seconds_per_image", "floor_fd_fashion_mnist",
                "floor_kid_fashion_mnist"):
        assert col in df.columns, col
    assert df["teacher_stochastic_gamma"].tolist() == [0.3, 0.3, 0.3]
    assert df["teacher_stochastic_fd_fashion_mnist"].tolist() == [8.0, 4.0, 2.0]
    assert df["floor_fd_fashion_mnist"].tolist() == [0.5, 0.5, 0.5]
    assert not any("uri" in c for c in df.columns)


def test_quality_long_format_columns():
    long = metrics.quality_long(_records())
    assert list(long.columns) == ["sampler", "steps", "metric", "value", "n_samples", "seconds_per_image"]
    gammas = long[(long.sampler == "teacher_stochastic") & (long.metric == "gamma")]
    assert gammas["value"].tolist() == [0.3, 0.3, 0.3]
    floor = long[long.sampler == "floor"]
    assert floor["steps"].isna().all() and set(floor["metric"]) == {"fd_fashion_mnist", "kid_fashion_mnist"}

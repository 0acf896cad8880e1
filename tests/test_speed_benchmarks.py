"""The speed benchmarks' own logic: the orchestration ledger's attribution, the GPU script's dry run."""

from __future__ import annotations

from benchmarks.speed import gpu_bench
from benchmarks.speed.common import RESULTS
from benchmarks.speed.orchestration import Ledger


def test_ledger_attributes_each_second_to_exactly_one_bucket() -> None:
    """Exclusive time: a nested call pauses its caller's bucket; labelled calls keep their own exclusive time."""
    now = [0.0]
    ledger = Ledger(clock=lambda: now[0])

    def store() -> None:
        now[0] += 2.0

    def train() -> None:
        now[0] += 1.0
        wrapped_store()
        now[0] += 3.0
        wrapped_store()

    wrapped_store = ledger.wrap("checkpoint store", store)
    wrapped_train = ledger.wrap("training", train, label=lambda: "round")
    wrapped_train()
    wrapped_store()
    assert dict(ledger.seconds) == {"training": 4.0, "checkpoint store": 6.0}
    assert sum(ledger.seconds.values()) == now[0]  # nothing counted twice, nothing lost
    assert dict(ledger.calls) == {"training": 1, "checkpoint store": 3}
    assert ledger.longest["training"] == 8.0  # inclusive, for the longest single call
    assert ledger.by_label == {"training: round": [4.0]}
    assert ledger.marks == [(0.0, "round", 0.0)]  # started at 0 s, no compute before it


def test_gpu_bench_dry_run_exercises_every_measurement_on_cpu(capsys) -> None:
    """The GPU script's paths (peak, FLOP count, fp32/bf16 updates, MFU, sampling) run; nothing is written."""
    before = RESULTS.read_bytes()
    gpu_bench.main(["--dry-run"])
    out = capsys.readouterr().out
    for needle in ("bf16 matmul peak", "fp32          teacher", "bf16          distill", "MFU",
                   "distillation / teacher update", "1-step sampling batch", "dry run: nothing written"):
        assert needle in out, f"{needle!r} missing from:\n{out}"
    assert RESULTS.read_bytes() == before

"""A NaN loss stops the round within one log window, naming round and steps; it is never retried."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pd_core import jobs
from pd_core.config import ConfigError
from pd_core.models import load_model
from pd_core.store import StorageIOError, StoreError, TransientStorageIOError
from pd_core.train import NonFiniteLossError
from tests.faults.helpers import _assert_nothing_partial, _cfg, _copy_of, _one_line, _round_key, _state_step


@pytest.mark.parametrize("how", ["injected", "diverging-lr"])
def test_nan_loss_stops_the_round_fast_and_keeps_the_last_good_student(template: Path, tmp_path: Path,
                                                                        how: str) -> None:
    cfg = _cfg("faults")
    store, student = _copy_of(template, tmp_path, cfg)
    before = store.read_manifest(student.key)
    key = _round_key(cfg, 2)
    run_cfg = cfg if how == "injected" else _cfg("faults", "distill.lr=1e12")
    fault = 7 if how == "injected" else None  # 0-based update index: the 8th update
    with pytest.raises(NonFiniteLossError) as err:
        jobs.run_round(run_cfg, store, round_index=2, teacher=student, fault_at_step=fault)
    message = _one_line(err.value)
    m = re.search(r"^round 2 \(4->2\): loss became (nan|inf|-inf) between steps (\d+) and (\d+);", message)
    assert m, message
    lo, hi = int(m.group(2)), int(m.group(3))
    if fault is not None:  # stopped at the first check after the NaN: within one log/checkpoint window
        assert lo <= fault + 1 <= hi and hi - (fault + 1) < cfg.distill.log_every, message
    assert not store.is_complete(key) and store.read_manifest(key) is None
    step = _state_step(store, key)
    assert step is None or step < lo, "a state with NaN weights must never be saved"
    if step is not None:
        tensors, _ = store.load_state(jobs.state_key(key))
        assert all(torch.isfinite(t).all() for n, t in tensors.items() if t.is_floating_point()), "state is not finite"
    # the previous student is untouched and still the latest good checkpoint
    assert store.is_complete(student.key) and store.read_manifest(student.key) == before
    model = load_model(store, student.key)
    assert all(torch.isfinite(p).all() for p in model.denoiser.net.parameters())
    _assert_nothing_partial(store, key)
    if how == "injected":  # without the fault, a rerun resumes from the last good state and completes
        again = jobs.run_round(cfg, store, round_index=2, teacher=student)
        assert again.trained and again.resumed_from == (step or 0) and store.is_complete(key)


def test_nan_is_never_retried_but_storage_io_is() -> None:
    from tasks.training import storage_error_only

    class _State:
        def __init__(self, err: BaseException) -> None:
            self.err = err

        def result(self) -> None:
            raise self.err

    def retried(err: BaseException) -> bool:
        return storage_error_only(None, None, _State(err))

    assert not retried(NonFiniteLossError("round 2 (4->2): loss became nan between steps 6 and 10"))
    assert not retried(ConfigError("distill.lr must be > 0"))
    assert not retried(jobs.PipelineMismatchError("trained with different settings"))
    assert not retried(StoreError("file:///s/pipelines/x/teacher: model-0123.safetensors is corrupt (sha256 ...)"))
    assert retried(TransientStorageIOError("cannot write s3://b/x: EndpointConnectionError; the store is unreachable"))
    assert not retried(StorageIOError("cannot write /s/x: OSError: [Errno 28] No space left on device; disk full"))
    assert retried(ConnectionResetError("reset"))

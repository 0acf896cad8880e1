"""In-round training state and the optimizer state, saved and restored without pickle."""

from __future__ import annotations

import json

import pytest
import torch

from pd_core.store import (
    CheckpointStore,
    StoreError,
)
from pd_core.train.optim_state import optimizer_state_to_tensors, tensors_to_optimizer_state
from tests.store.helpers import (
    KEY,
    SimulatedCrash,
    _assert_same,
    _assert_state_equal,
    _crash_in,
    _is_tmp,
    _manifest,
    _net,
    _raw_names,
    _rewrite,
    _train_steps,
    _weights,
)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_continues_identically_after_state_round_trip(store: CheckpointStore, amsgrad: bool) -> None:
    model = _net(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=amsgrad)
    _train_steps(model, opt, start=0, count=3)

    opt_tensors, opt_meta = optimizer_state_to_tensors(opt.state_dict())
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
               **{f"optim.{k}": v for k, v in opt_tensors.items()}, "rng.torch": torch.get_rng_state()}
    store.save_state(f"{KEY}.state", tensors=tensors, meta={"step": 3, "optimizer": opt_meta})
    expected_noise = torch.randn(5)

    loaded, meta = store.load_state(f"{KEY}.state")
    assert meta["step"] == 3
    resumed = _net(123)  # different init: everything must come from the saved state
    resumed.load_state_dict({k[6:]: v for k, v in loaded.items() if k.startswith("model.")})
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=999.0)
    state_dict = tensors_to_optimizer_state({k[6:]: v for k, v in loaded.items() if k.startswith("optim.")},
                                            meta["optimizer"])
    _assert_state_equal(state_dict, opt.state_dict())
    resumed_opt.load_state_dict(state_dict)
    torch.set_rng_state(loaded["rng.torch"])
    assert torch.equal(torch.randn(5), expected_noise)

    _train_steps(model, opt, start=3, count=4)
    _train_steps(resumed, resumed_opt, start=3, count=4)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    _assert_state_equal(resumed_opt.state_dict(), opt.state_dict())


def test_state_lifecycle(store: CheckpointStore) -> None:
    key = f"{KEY}.state"
    assert store.load_state(key) is None
    store.save_state(key, tensors={"w": torch.ones(3)}, meta={"step": 1, "note": [1, 2]})
    store.save_state(key, tensors={"w": torch.full((3,), 2.0)}, meta={"step": 2})
    tensors, meta = store.load_state(key)
    assert meta == {"step": 2} and torch.equal(tensors["w"], torch.full((3,), 2.0))
    assert _raw_names(store, key) == {"state.json", json.loads(store.get_bytes(f"{key}/state.json"))["files"]
                                      ["tensors"]["path"]}
    store.clear_state(key)
    assert store.load_state(key) is None
    store.clear_state(key)  # idempotent


def test_state_and_checkpoint_can_share_a_key(local_store: CheckpointStore) -> None:
    local_store.save_checkpoint(KEY, tensors=_weights(1), manifest=_manifest())
    local_store.save_state(KEY, tensors={"w": torch.ones(2)}, meta={"step": 5})
    local_store.save_checkpoint(KEY, tensors=_weights(2), manifest=_manifest())  # must not remove the state
    assert local_store.load_state(KEY)[1] == {"step": 5}
    local_store.clear_state(KEY)
    _assert_same(local_store.load_checkpoint(KEY)[0], _weights(2))


def test_crash_mid_state_save_keeps_previous_state(local_store: CheckpointStore,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    key = f"{KEY}.state"
    local_store.save_state(key, tensors={"w": torch.ones(3)}, meta={"step": 10})
    _crash_in(local_store, monkeypatch, method="pipe_file", when=_is_tmp("state"), partial=True)
    with pytest.raises(SimulatedCrash):
        local_store.save_state(key, tensors={"w": torch.zeros(3)}, meta={"step": 20})
    monkeypatch.undo()
    tensors, meta = local_store.load_state(key)
    assert meta == {"step": 10} and torch.equal(tensors["w"], torch.ones(3))


def test_corrupt_state_is_refused(local_store: CheckpointStore) -> None:
    key = f"{KEY}.state"
    local_store.save_state(key, tensors={"w": torch.ones(3)}, meta={"step": 1})
    name = json.loads(local_store.get_bytes(f"{key}/state.json"))["files"]["tensors"]["path"]
    _rewrite(local_store, key, name, lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(StoreError, match="is corrupt"):
        local_store.load_state(key)


def test_optimizer_helpers_keep_types_and_refuse_unstorable_values() -> None:
    state = {"state": {0: {"step": torch.tensor(2.0), "buf": torch.ones(2)}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0], "foreach": None, "__odd": 1}]}
    tensors, meta = optimizer_state_to_tensors(state)
    assert set(tensors) == {"state/0/step", "state/0/buf"}
    json.dumps(meta)  # JSON-able
    _assert_state_equal(tensors_to_optimizer_state(tensors, json.loads(json.dumps(meta))), state)
    with pytest.raises(TypeError, match="param_groups/0/fn"):
        optimizer_state_to_tensors({"param_groups": [{"fn": lambda: 0}]})
    with pytest.raises(ValueError, match="not among the given tensors"):
        tensors_to_optimizer_state({}, meta)
    with pytest.raises(ValueError, match="format"):
        tensors_to_optimizer_state(tensors, {"structure": {}})

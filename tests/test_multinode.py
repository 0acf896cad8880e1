"""A round on two nodes: two torchrun agents on 127.0.0.1 (gloo, c10d rendezvous), one process each.

Each process of the two-node job takes distill.batch_size / 2 = 8 examples of the global batch 16
(batch_size x nproc); the one-node job of two processes with batch_size 8 has the same global batch
and gives each rank the same rows and the same noise (``rank_batches``), so the students agree to
float rounding. A worker SIGKILLed after the in-round state of update 3 makes torchrun restart the
job (``--max-restarts``); the restarted ranks resume from that state and end with the weights of
the uninterrupted two-node round, byte for byte.
"""

from __future__ import annotations

import pytest
import torch

from pd_core import launch
from pd_core.config import ConfigError, load_config
from pd_core.data import BatchSampler, ImageData
from pd_core.distributed_job import SIGKILL_AT_ENV
from pd_core.store import CheckpointStore
from pd_core.train import Runtime, rank_batches
from tests.multinode_rounds import round_cfg


def _runtime(rank: int, world: int, nodes: int) -> Runtime:
    return Runtime(device=torch.device("cpu"), autocast_dtype=None, channels_last=False, compile=False, rank=rank,
                   world_size=world, nodes=nodes)


@pytest.mark.parametrize(("nodes", "per_node"), [(2, 1), (2, 2), (3, 2)])
def test_each_rank_of_n_nodes_takes_the_rows_of_the_same_rank_on_one_node(nodes, per_node):
    g = torch.Generator().manual_seed(0)
    data = ImageData(images=torch.rand(23, 1, 4, 4, generator=g), labels=torch.arange(23), num_classes=23, name="t")
    world, batch = nodes * per_node, 6 * nodes  # batch per process of one node of per_node processes
    multi = BatchSampler(data, batch_size=batch, seed=4)
    one_node = BatchSampler(data, batch_size=batch // nodes, seed=4)  # world processes on one node
    glob = BatchSampler(data, batch_size=batch * per_node, seed=4)  # the global batch in one process
    for step in range(5):
        got = [rank_batches(multi.batch, _runtime(r, world, nodes))(step) for r in range(world)]
        want = [rank_batches(one_node.batch, _runtime(r, world, 1))(step) for r in range(world)]
        for (x, y), (x_ref, y_ref) in zip(got, want, strict=True):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
        assert torch.equal(torch.cat([y for _, y in got]), glob.batch(step)[1])  # global batch: batch x per_node


def test_batch_sizes_that_do_not_divide_by_the_node_count_are_refused():
    with pytest.raises(ConfigError, match=r"distill.batch_size must divide by runtime.nodes=3"):
        load_config(preset="smoke", overrides=["runtime.nodes=3", "teacher.batch_size=63", "guidance.batch_size=3",
                                               "distill.batch_size=64"])


def _weights(store, info) -> dict[str, torch.Tensor]:
    return CheckpointStore(str(store)).load_checkpoint(info.key)[0]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_nodes_give_the_student_of_one_node_with_the_same_global_batch(two_node_round):
    store, teacher, two, lines = two_node_round
    one = launch.launch_job(round_cfg(store, "mn-one", nodes=1, nproc=2, batch=8), job="round", round_index=1,
                            teacher=teacher)
    assert any("effective batch 16 = 8 per process x 2 process(es) on 2 nodes" in line for line in lines), lines
    got, want = _weights(store, two), _weights(store, one)
    teacher_weights = _weights(store, teacher)
    assert any(not torch.equal(got[k], teacher_weights[k]) for k in got)  # the round moved the weights
    for name, ref in want.items():
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_killed_worker_restarts_the_job_which_resumes_to_the_uninterrupted_weights(two_node_round, monkeypatch):
    store, teacher, straight, _ = two_node_round
    monkeypatch.setenv(SIGKILL_AT_ENV, "4")  # rank 0's worker, after the in-round state of update 3
    lines: list[str] = []
    killed = launch.launch_job(round_cfg(store, "mn-killed"), job="round", round_index=1, teacher=teacher,
                               log_line=lines.append)
    text = "\n".join(lines)
    assert "Signals.SIGKILL" in text or "exitcode: -9" in text, text[-3000:]  # torchrun saw the kill ...
    assert killed.resumed_from == 3  # ... and the restarted job resumed from the in-round state
    assert killed.sha256 == straight.sha256

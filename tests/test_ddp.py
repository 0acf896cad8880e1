"""Data-parallel training: 2 gloo processes on CPU against 1 process with the doubled batch.

The exactness test builds the 2-process run so that it computes the same thing as one process
with batch 2B: rank r takes rows [rB, (r+1)B) of the single-process batch (``rank_batches`` over
the same BatchSampler stream) and the same noise rows, so the DDP-averaged gradient equals the
single-process gradient and the loss curves agree to float rounding. The launcher test runs the
production path (torchrun -> pd_core.distributed_job -> jobs.run_round, rank 0 writing),
including a NaN fault, a resume from rank 0's in-round checkpoint with every rank's RNG state,
and the same final weights as an uninterrupted 2-process run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pd_core import dist as pd_dist
from pd_core import jobs, launch
from pd_core.config import load_config
from pd_core.data import BatchSampler, ImageData
from pd_core.denoiser import Denoiser
from pd_core.distill import distillation_target
from pd_core.net import free_port
from pd_core.schedule import alpha_sigma, logsnr
from pd_core.store import CheckpointStore
from pd_core.train import (
    DeviceBatches,
    LoopSpec,
    NonFiniteLossError,
    Runtime,
    TrainState,
    data_parallel,
    rank_batches,
    run_loop,
)
from pd_core.unet import UNet, UNetSpec
from pd_core.weighting import per_example_loss

SPEC = UNetSpec(in_channels=1, out_channels=1, image_size=8, ch=16, emb_ch=64, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(), dropout=0.0, norm_groups=8)
PER_RANK, WORLD, STEPS, STUDENT_STEPS = 4, 2, 8, 4


def _runtime(rank: int = 0, world: int = 1) -> Runtime:
    return Runtime(device=torch.device("cpu"), autocast_dtype=None, channels_last=False, compile=False, rank=rank,
                   world_size=world)


def _data(n: int = 48, *, labels: bool = False) -> ImageData:
    g = torch.Generator().manual_seed(7)
    images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(0, 3, (n,), generator=g) if labels else None
    return ImageData(images=images, labels=y, num_classes=3 if labels else 0, name="synthetic")


def _nets() -> tuple[UNet, UNet]:
    torch.manual_seed(0)
    teacher = UNet(SPEC)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a non-trivial teacher (zero-initialised output convs otherwise)
    student = UNet(SPEC)
    student.load_state_dict(teacher.state_dict())
    return student, teacher.eval().requires_grad_(False)


def _train(*, rank: int, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Distil with noise rows fixed per (step, global row): rank r uses rows [rB, (r+1)B) of the global batch."""
    student, teacher = _nets()
    runtime = _runtime(rank, world)
    per_rank = PER_RANK * WORLD // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    net = data_parallel(student, runtime)
    step = [0]

    def loss_fn(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + step[0])
        step[0] += 1
        i = torch.randint(0, STUDENT_STEPS, (PER_RANK * WORLD,), generator=g)[rows]  # (B,)
        eps = torch.randn((PER_RANK * WORLD, *x.shape[1:]), generator=g)[rows]  # (B, C, H, W)
        t = (i + 1).float() / STUDENT_STEPS
        lam = logsnr(t)
        alpha, sigma = (v[:, None, None, None] for v in alpha_sigma(lam))
        z = alpha * x + sigma * eps
        with torch.no_grad():
            x_tilde = distillation_target(Denoiser(teacher, parameterization="x"), z=z, t=t, num_steps=STUDENT_STEPS)
        x_hat, _ = Denoiser(net, parameterization="x")(z, lam)
        return per_example_loss(x_hat=x_hat, x=x_tilde, logsnr=lam, kind="snr_trunc")

    # SGD: weights are linear in the averaged gradient, so they agree to float rounding (Adam's 1/sqrt(v)
    # would blow rounding differences of near-zero gradients up to a fraction of lr)
    state = TrainState(model=student, optimizer=torch.optim.SGD(student.parameters(), lr=0.02, momentum=0.9), ema=None,
                       step=0, noise_generator=torch.Generator())
    spec = LoopSpec(phase="ddp-test", total_steps=STEPS, lr_fn=lambda s: 0.02, grad_clip=1.0, ema_decay=None,
                    log_every=1, checkpoint_every=0)
    losses: list[float] = []
    sampler = BatchSampler(_data(), batch_size=per_rank, seed=3)
    run_loop(state=state, spec=spec, loss_fn=loss_fn, sample_batch=rank_batches(sampler.batch, runtime),
             runtime=runtime, on_progress=lambda e: losses.append(e.loss))
    return losses, {k: v.detach().clone() for k, v in student.state_dict().items()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        losses, weights = _train(rank=rank, world=world)
        torch.save({"losses": losses, "weights": weights}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_rank_batches_are_the_doubled_batch_split_by_rank():
    data = _data(10)  # 10 images: the doubled batch straddles epochs
    single = BatchSampler(data, batch_size=2 * PER_RANK, seed=5)
    per_rank = BatchSampler(data, batch_size=PER_RANK, seed=5)
    fetch = [rank_batches(per_rank.batch, _runtime(r, WORLD)) for r in range(WORLD)]
    for step in range(6):
        together = torch.cat([fetch[r](step)[0] for r in range(WORLD)])
        assert torch.equal(together, single.batch(step)[0])
    assert rank_batches(per_rank.batch, _runtime()) == per_rank.batch  # one process: unchanged


@pytest.mark.parametrize("flip", [False, True])
def test_device_batches_equal_the_sampler(flip):
    sampler = BatchSampler(_data(10, labels=True), batch_size=4, seed=1, random_flip=flip)
    device_batches = DeviceBatches(sampler, torch.device("cpu"))
    for step in range(5):
        (x, y), (x2, y2) = sampler.batch(step), device_batches(step)
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_two_gloo_processes_match_one_process_with_double_batch(tmp_path):
    mp.spawn(_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    ref_losses, ref_weights = _train(rank=0, world=1)
    assert len(ranks[0]["losses"]) == STEPS and ranks[1]["losses"] == []  # progress is reported by rank 0 only
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6)
    assert ref_losses[-1] < ref_losses[0]  # it learns: the comparison is not between two flat lines
    for name, ref in ref_weights.items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name  # replicas stay identical
        torch.testing.assert_close(ranks[0]["weights"][name], ref, rtol=1e-4, atol=1e-6)


def _run_on_main_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        calls = Path(out) / "calls"

        def write() -> str:
            with calls.open("a") as f:
                f.write(f"{rank}\n")
            return f"written by rank {rank}"

        got = pd_dist.run_on_main(write)
        try:
            pd_dist.run_on_main(lambda: (_ for _ in ()).throw(OSError("disk full")))
            error = None
        except Exception as err:  # noqa: BLE001 - the test records what each rank raised
            error = f"{type(err).__name__}: {err}"
        (Path(out) / f"rank{rank}.txt").write_text(f"{got}|{error}")
    finally:
        dist.destroy_process_group()


def test_run_on_main_runs_once_on_rank_zero_and_shares_its_result_or_error(tmp_path):
    mp.spawn(_run_on_main_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert (tmp_path / "calls").read_text() == "0\n"  # one write, by rank 0
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text().split("|") for r in range(WORLD))
    assert rank0[0] == rank1[0] == "written by rank 0"
    assert rank0[1] == "OSError: disk full"  # rank 0 raises its own error
    assert rank1[1] == "DistributedJobError: rank 0 failed: OSError: disk full"  # the others do not hang
    assert pd_dist.run_on_main(lambda: 42) == 42  # no process group: just the call


def test_child_errors_come_back_as_their_own_type():
    assert isinstance(launch._rebuild_error("NonFiniteLossError", "nan"), NonFiniteLossError)  # noqa: SLF001
    err = launch._rebuild_error("KeyError", "boom")  # noqa: SLF001
    assert isinstance(err, pd_dist.DistributedJobError) and "KeyError: boom" in str(err)


def _smoke(tmp_path: Path, name: str, **distill) -> object:
    overrides = [f"pipeline.name={name}", f"storage.root={tmp_path / 'store'}", "teacher.updates=6",
                 "teacher.checkpoint_every=100", "teacher.log_every=3", "distill.updates_per_round=6",
                 "distill.log_every=2", "distill.checkpoint_every=3", "distill.batch_size=16", "runtime.nproc=2",
                 "eval.enabled=false", *[f"distill.{k}={v}" for k, v in distill.items()]]
    return load_config(preset="smoke", overrides=overrides)


@pytest.mark.timeout(240)
def test_torchrun_round_reports_progress_and_checkpoints_on_rank_zero(tmp_path):
    cfg = _smoke(tmp_path, "ddp")
    store = CheckpointStore(cfg.storage.root)
    teacher = jobs.ensure_teacher(cfg, store)  # single process
    events, lines = [], []
    info = launch.launch_job(cfg, job="round", round_index=1, teacher=teacher, on_progress=events.append,
                                  log_line=lines.append)
    assert info.trained and info.steps == cfg.distill.start_steps // 2 and info.round == 1
    assert [e.step for e in events] == [2, 4, 6] and all(e.loss > 0 for e in events)
    assert any("effective batch 32 = 16 per process x 2 process(es)" in line for line in lines), lines
    assert store.is_complete(info.key) and store.read_manifest(info.key)["sha256"] == info.sha256
    assert store.load_state(jobs.state_key(info.key)) is None  # rank 0 cleared the in-round state


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_round_resumes_every_rank_exactly(tmp_path):
    """NaN at update 4 (after rank 0's checkpoint at 3, which holds both ranks' RNG states), rerun: the
    resumed round ends with the weights of an uninterrupted 2-process round."""
    straight_cfg, faulty_cfg = _smoke(tmp_path, "ddp-straight"), _smoke(tmp_path, "ddp-resumed")
    store = CheckpointStore(straight_cfg.storage.root)
    teachers = [jobs.ensure_teacher(c, store) for c in (straight_cfg, faulty_cfg)]
    assert teachers[0].sha256 == teachers[1].sha256
    straight = launch.launch_job(straight_cfg, job="round", round_index=1, teacher=teachers[0])
    with pytest.raises(NonFiniteLossError):
        launch.launch_job(faulty_cfg, job="round", round_index=1, teacher=teachers[1], fault_at_step=4)
    key = jobs.round_key("ddp-resumed", round_index=1, student_steps=straight.steps)
    assert store.load_state(jobs.state_key(key))[1]["world_size"] == 2
    resumed = launch.launch_job(faulty_cfg, job="round", round_index=1, teacher=teachers[1])
    assert resumed.resumed_from == 3
    assert resumed.sha256 == straight.sha256

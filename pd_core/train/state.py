"""What an in-round checkpoint holds: weights, optimizer, EMA, step and every generator's state."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pd_core import dist
from pd_core.train.optim_state import optimizer_state_to_tensors, tensors_to_optimizer_state

log = logging.getLogger("pd_core.train")


@dataclass
class TrainState:
    """Everything a resumed run needs: weights, optimizer, EMA, step and RNG states."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: list[Tensor] | None
    step: int
    noise_generator: torch.Generator
    # data-parallel: every rank's generator states ({"noise", "torch"[, "cuda"]} per rank), gathered at each
    # checkpoint so that rank 0's saved state resumes every rank exactly; None in a single process
    rank_rng: list[dict[str, Tensor]] | None = None

    def rng_states(self) -> dict[str, Tensor]:
        """This process's generator states: the noise generator, torch's CPU RNG (dropout on CPU), CUDA's RNG."""
        states = {"noise": self.noise_generator.get_state().cpu(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state()
        return states

    def _set_rng_states(self, states: dict[str, Tensor]) -> None:
        self.noise_generator.set_state(states["noise"].to(self.noise_generator.get_state().device))
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA weights as a state dict (the model's own weights when there is no EMA)."""
        sd = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            for (name, _), e in zip(self.model.named_parameters(), self.ema, strict=True):
                sd[name] = e.detach().clone()
        return sd

    def to_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """Flatten to (tensors, json meta) for ``CheckpointStore.save_state`` (no pickle)."""
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{i}": e.detach().cpu().contiguous() for i, e in enumerate(self.ema)})
        opt_tensors, opt_meta = optimizer_state_to_tensors(self.optimizer.state_dict())
        tensors.update({f"optim.{k}": v.cpu().contiguous() for k, v in opt_tensors.items()})
        tensors.update({f"rng.{k}": v for k, v in self.rng_states().items()})
        meta = {"step": self.step, "optimizer": opt_meta, "has_ema": self.ema is not None}
        if self.rank_rng is not None:
            for rank, states in enumerate(self.rank_rng):
                tensors.update({f"rng.rank{rank}.{k}": v.cpu() for k, v in states.items()})
            meta["world_size"] = len(self.rank_rng)
        return tensors, meta

    def load_tensors(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore from :meth:`to_tensors`' output."""
        device = next(self.model.parameters()).device
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if self.ema is not None:
            if not meta.get("has_ema"):
                raise ValueError("the saved training state has no EMA weights but this run uses EMA")
            for i, e in enumerate(self.ema):
                e.copy_(tensors[f"ema.{i}"].to(device))
        opt = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
        self.optimizer.load_state_dict(tensors_to_optimizer_state(opt, meta["optimizer"]))
        info = dist.current()
        saved_world = int(meta.get("world_size", 1))
        if info.world_size == 1 and saved_world == 1:
            prefix = "rng."
        elif saved_world == info.world_size:
            prefix = f"rng.rank{info.rank}."
        else:
            prefix = "rng." if info.rank == 0 else None
            if info.is_main:
                log.warning("the saved training state was written by %d process(es), this run has %d: the batch stream "
                            "and the other ranks' noise continue differently than an uninterrupted run",
                            saved_world, info.world_size)
        if prefix is not None:
            self._set_rng_states({k[len(prefix):]: v for k, v in tensors.items()
                                  if k.startswith(prefix) and "." not in k[len(prefix):]})
        self.step = int(meta["step"])



CheckpointHook = Callable[[TrainState], None]

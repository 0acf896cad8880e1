"""Which diffusers scheduler configs describe a model we can import, and what each setting becomes.

An imported model is a discrete-time variance-preserving (VP) model: it was trained on the DDPM
table alpha_bar_k = prod_{j <= k} (1 - beta_j), k = 0 .. T - 1, at integer timesteps k. Every
scheduler class in :data:`VP_SCHEDULERS` builds its betas from the same settings (``beta_schedule``,
``beta_start``, ``beta_end``, ``trained_betas``, ``num_train_timesteps``), so a folder saved with
any of them holds the same kind of model; any other class (flow matching, VE score SDEs, EDM,
consistency models, ...) is refused by :func:`check_scheduler_class`.

Each setting of the folder's config is one of

- the table and the prediction type (:data:`TABLE_SETTINGS`): honoured by the import;
- DDIM sampling settings (:data:`DDIM_SETTINGS`): honoured by the ``diffusers_ddim`` baseline, which
  is ``DDIMPipeline.from_pretrained(folder)`` with its defaults (``DDIMScheduler.from_config`` of the
  folder's config, :mod:`pd_core.interop.diffusers_ddim`); our own samplers and the distillation walk
  diffusers' "trailing" integer timesteps, end at alpha = 1 and clip x_hat to [-1, 1], so a value
  that differs from that is named as not used by them;
- anything else (``variance_type``, ``solver_order``, ``use_karras_sigmas``, ``skip_prk_steps``, ...):
  settings of the class's own sampler, not used (the teacher is sampled with DDIM).

:func:`scheduler_notes` returns one line per setting that is not used, saying why; the import logs
them as warnings.
"""

from __future__ import annotations

VP_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler", "SASolverScheduler",
    "DDPMParallelScheduler", "DDIMParallelScheduler",
)
TABLE_SETTINGS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "rescale_betas_zero_snr")
# DDIM setting -> the value our own samplers and the distillation effectively use
OUR_DDIM = {"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 1.0,
            "thresholding": False}
DDIM_SETTINGS = (*OUR_DDIM, "steps_offset", "dynamic_thresholding_ratio", "sample_max_value")
WHY_OURS = {
    "timestep_spacing": "teacher_ddim and the distillation walk 'trailing' integer timesteps, whose grids nest "
                        "from one halving to the next",
    "steps_offset": "it shifts 'leading' timesteps only; teacher_ddim and the distillation walk 'trailing' ones",
    "set_alpha_to_one": "our samplers end at alpha = 1 (the clean image x_hat), as the distillation target does",
    "clip_sample": "our samplers clip x_hat to [-1, 1], the range of the training data",
    "clip_sample_range": "our samplers clip x_hat to [-1, 1], the range of the training data",
    "thresholding": "our samplers clip x_hat to [-1, 1] instead of dynamic thresholding",
    "dynamic_thresholding_ratio": "thresholding is off in our samplers",
    "sample_max_value": "thresholding is off in our samplers",
}


class UnsupportedScheduler(ValueError):
    """A scheduler class whose model is not a discrete-time VP (DDPM-table) model."""


def check_scheduler_class(name: str | None, *, source: str) -> str:
    """The scheduler's class name (DDPMScheduler when the config names none); UnsupportedScheduler otherwise."""
    name = name or "DDPMScheduler"
    if name not in VP_SCHEDULERS:
        raise UnsupportedScheduler(
            f"{source}: _class_name {name!r} is not a discrete-time VP scheduler sharing DDPM's betas, so its model "
            f"is of another kind (flow matching, VE SDE, EDM, consistency, ...) and cannot be distilled here; "
            f"importable: {', '.join(VP_SCHEDULERS)}")
    return name


def _differs(key: str, value) -> bool:
    """Whether a DDIM setting's value makes DDIM differ from what our samplers do."""
    if key == "steps_offset":
        return bool(value) and value != 0
    if key == "clip_sample_range":
        return not (isinstance(value, (int, float)) and float(value) == 1.0)
    return value != OUR_DDIM[key]


def scheduler_notes(name: str, config: dict, *, source: str) -> tuple[str, ...]:
    """One line per setting of ``config`` (a scheduler config, private keys removed) that is not used, saying why.

    ``name`` is the scheduler's class; DDIM settings at the values our samplers use are not named.
    """
    notes = []
    for key in sorted(config):
        value = config[key]
        if key in TABLE_SETTINGS:
            continue
        if key in DDIM_SETTINGS:
            if key in ("dynamic_thresholding_ratio", "sample_max_value"):
                if config.get("thresholding"):
                    notes.append(f"{source}: {key}={value!r} is used only by the diffusers_ddim baseline; "
                                 f"{WHY_OURS[key]}")
            elif _differs(key, value):
                notes.append(f"{source}: {key}={value!r} is used only by the diffusers_ddim baseline "
                             f"(DDIMPipeline's own loop); {WHY_OURS[key]}")
            continue
        notes.append(f"{source}: {key}={value!r} is not used: a setting of {name}'s own sampler; the teacher is "
                     f"sampled and distilled with DDIM (diffusers_ddim: DDIMPipeline with the folder's config)")
    return tuple(notes)

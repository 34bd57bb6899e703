"""Sampler names users type (bot.domain.SAMPLERS) mapped to diffusers schedulers.

Example:
    >>> pipe.scheduler = make_scheduler("dpmpp_2m_karras", pipe.scheduler.config)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,  # needs SciPy, a dependency of Easel for this reason
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from bot.domain import SAMPLERS

# name -> (scheduler class, settings that override the model's scheduler config). Every name in
# bot.domain.SAMPLERS has an entry (tests/test_generation.py checks it).
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler,
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler `name`, built from a model's scheduler `config` (its betas and timesteps).

    Schedulers keep per-call state (step index, history of model outputs), so every diffusers call
    gets its own.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"`sampler` must be one of {', '.join(SAMPLERS)}, but is {name!r}")
    scheduler_class, overrides = SCHEDULERS[name]
    return scheduler_class.from_config(config, **overrides)

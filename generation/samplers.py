"""Sampler names users type (bot.domain.SAMPLERS) mapped to diffusers schedulers.

Example:
    >>> pipe.scheduler = make_scheduler("dpmpp_2m_karras", pipe.scheduler.config)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler  # the real class: see below
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from bot.domain import SAMPLERS


class ExactLMSDiscreteScheduler(LMSDiscreteScheduler):
    """diffusers' LMS sampler without its SciPy dependency.

    diffusers integrates each LMS coefficient with `scipy.integrate.quad` (and, without SciPy,
    `diffusers.LMSDiscreteScheduler` is a placeholder that refuses to load). The integrand is a polynomial of degree `order - 1`, which
    Gauss-Legendre quadrature with `order` nodes integrates exactly: same coefficients, no SciPy.
    """

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        nodes, weights = np.polynomial.legendre.leggauss(order)
        start, end = float(self.sigmas[t]), float(self.sigmas[t + 1])
        taus = (end - start) / 2 * nodes + (start + end) / 2
        sigmas = [float(self.sigmas[t - k]) for k in range(order)]
        values = np.ones_like(taus)
        for k in range(order):
            if k != current_order:
                values *= (taus - sigmas[k]) / (sigmas[current_order] - sigmas[k])
        return float((end - start) / 2 * np.sum(weights * values))


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
    "lms": (ExactLMSDiscreteScheduler, {}),
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

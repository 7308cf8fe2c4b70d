"""Sampling schedulers by the names A1111 users know, built from the base's own schedule."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

# A1111 name -> (class, extra config). Keys are what PNG `Sampler:` fields say.
SAMPLERS = {
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "DDIM": (DDIMScheduler, {}),
}
# Command-line spellings.
ALIASES = {"euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M",
           "dpmpp_2m_karras": "DPM++ 2M Karras", "ddim": "DDIM"}


def sampler_name(name: str) -> str:
    """Canonical A1111 name for `name` (either spelling); raises listing the choices."""
    if name in SAMPLERS:
        return name
    if name.lower() in ALIASES:
        return ALIASES[name.lower()]
    raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(ALIASES)} or {sorted(SAMPLERS)}")


def set_sampler(pipe, name: str) -> str:
    """Replace the pipeline's scheduler, keeping the base's noise schedule and prediction type."""
    canonical = sampler_name(name)
    cls, extra = SAMPLERS[canonical]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    return canonical

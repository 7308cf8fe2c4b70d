"""Sampling schedulers by the names A1111 users know, built from the base's own schedule: the
one place `generate` and the app set a loaded pipeline's sampler (`set_pipeline_sampler`).

UNet bases (SD 1.x, 2.x, SDXL) take every sampler of SAMPLERS, built from the base's own noise
schedule. SD3's bases sample along a rectified flow, which those DDPM samplers do not: they get
diffusers' flow-matching Euler (the scheduler SD3 ships with), plain ("Euler") or ancestral
("Euler a": each step re-noises the predicted image to the next noise level with fresh noise,
as A1111's ancestral samplers do), with the base's own shift.
"""

from __future__ import annotations

from sd_lora.errors import UserError
from sd_lora.models.families import FLOW, prediction_type_of

# A1111 name -> (diffusers scheduler class, extra config). Keys are what PNG `Sampler:` fields
# say. Classes by name: diffusers is imported when a sampler is set, so that `sd-lora --help`
# (which shows the default sampler) stays quick.
SAMPLERS = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "DDIM": ("DDIMScheduler", {}),
}
# Command-line spellings.
ALIASES = {"euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M",
           "dpmpp_2m_karras": "DPM++ 2M Karras", "ddim": "DDIM"}
# The one default of `sd-lora generate` and the app (A1111's long-standing default): defined
# once, so the same prompt and seed give the same pixels in both (tests/test_app_client.py).
DEFAULT_SAMPLER = "Euler a"


def cli_sampler(name: str) -> str:
    """The command-line spelling of an A1111 sampler name ("Euler a" -> "euler_a")."""
    canonical = sampler_name(name)
    return next(alias for alias, full in ALIASES.items() if full == canonical)


def sampler_name(name: str) -> str:
    """Canonical A1111 name for `name` (either spelling); raises listing the choices."""
    if name in SAMPLERS:
        return name
    if name.lower() in ALIASES:
        return ALIASES[name.lower()]
    raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(ALIASES)} or {sorted(SAMPLERS)}")


def set_sampler(pipe, name: str) -> str:
    """Replace the pipeline's scheduler, keeping the base's noise schedule and prediction type."""
    import diffusers

    canonical = sampler_name(name)
    class_name, extra = SAMPLERS[canonical]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)
    return canonical


# SD3: A1111 name -> FlowMatchEulerDiscreteScheduler's stochastic_sampling.
FLOW_SAMPLERS = {"Euler": False, "Euler a": True}


class SamplerError(UserError):
    """A sampler the loaded base cannot sample with; the message names both and the choices."""


def set_pipeline_sampler(pipe, name: str) -> str:
    """Set `pipe`'s sampler named `name` (either spelling) from the base's current scheduler
    config; returns the canonical A1111 name, which the PNG parameters record."""
    if prediction_type_of(pipe) != FLOW:
        return set_sampler(pipe, name)
    from diffusers import FlowMatchEulerDiscreteScheduler

    canonical = sampler_name(name)
    if canonical not in FLOW_SAMPLERS:
        raise SamplerError(
            f"sampler {canonical!r} is for the UNet bases' noise schedules; this SD 3.x base "
            f"samples along a rectified flow: choose one of {list(FLOW_SAMPLERS)} "
            "(on the command line: --sampler euler or euler_a)"
        )
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, stochastic_sampling=FLOW_SAMPLERS[canonical])
    return canonical

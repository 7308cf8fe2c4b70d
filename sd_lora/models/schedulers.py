"""Sampling schedulers by the names A1111 users know, built from the base's own schedule."""

from __future__ import annotations

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

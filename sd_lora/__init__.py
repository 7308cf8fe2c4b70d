"""sd-lora: train Stable Diffusion LoRA adapters that load the same everywhere.

Heavy libraries (torch, diffusers) load on first use, so `sd-lora --help` stays fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_pipeline": ("sd_lora.models.load", "load_pipeline"),
    "load_config": ("sd_lora.config", "load_config"),
    "train": ("sd_lora.train.recipe", "train"),
    "load_adapter": ("sd_lora.adapters.files", "load_adapter"),
    "save_adapter": ("sd_lora.adapters.files", "save_adapter"),
    "apply_adapters": ("sd_lora.adapters.apply", "apply_adapters"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sd_lora' has no attribute {name!r}")

"""Step 1 of the sd-scripts check of sd-lora's SD3 kohya LoRA files: write a file and what it must do.

    .venv/bin/python bench/sd3_sd_scripts_check.py [--work /tmp/sd3_check]
    <sd-scripts venv>/bin/python bench/sd3_sd_scripts_apply.py --sd-scripts <checkout> [--work ...]

This step (sd-lora's env) builds the built-in `tiny-sd3` pipeline, puts a LoRA on the
transformer (attn, ff, adaln: r=4, alpha=8) and on both CLIPs (attn, mlp: r=4, alpha=4), fills
every lora_B at random and saves the adapter with sd-lora's own writer (`save_adapter`, kohya
format, fp32). Beside it, in `--work`: the base weights (the transformer in the original MMDiT
layout that sd-scripts loads, the CLIPs as transformers state dicts), fixed inputs (latents,
timesteps, token ids, the T5 states) and the reference outputs of the adapted models: the
transformer's prediction and the CLIPs' penultimate states and projected pooled outputs. Step 2
(`sd3_sd_scripts_apply.py`, sd-scripts' env, no sd_lora import) loads the same file with
sd-scripts' `networks.lora_sd3` and compares.

One change from the built-in base: sd-scripts' MMDiT fixes its width from its depth (hidden =
64 x depth, heads = depth, so 64-wide heads), which the built-in transformer (3 blocks, 4 heads
of 8) does not follow. The transformer is therefore rebuilt from the built-in config with 3
heads of 64 (hidden 192, caption projection 192): the same topology (3 blocks, MMDiT-X attn2 in
blocks 0-1, a context_pre_only last block, RMS q/k norm) and the same module names, so the
same LoRA keys. `--builtin-transformer` keeps the built-in one (step 2 then says why sd-scripts
cannot build it). `--no-attn2` drops the MMDiT-X blocks (SD3.5 Large's topology): sd-scripts'
MMDiT splits attn2's heads differently from SAI's reference and diffusers (step 2 says how).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peft.tuners.lora import LoraLayer  # noqa: E402

from sd_lora.adapters.files import save_adapter  # noqa: E402
from sd_lora.formats.sd3_checkpoint import (  # noqa: E402  (proved against diffusers' converter)
    TRANSFORMER_PREFIX,
    transformer_to_original,
)
from sd_lora.lora.inject import ADAPTER_NAME, add_lora, lora_weight, read_adapter_state  # noqa: E402
from sd_lora.models.builtin.tiny_sd3 import tiny_sd3_transformer_config  # noqa: E402
from sd_lora.models.load import load_pipeline  # noqa: E402
from sd_lora.models.text import (  # noqa: E402
    encode_all,
    text_encoders_of,
    tokenize_all,
    tokenizers_of,
)
from tests.lora_helpers import fill_lora_B  # noqa: E402  (the tests' random up projections)


def original_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's weights in the original MMDiT names, without the file prefix."""
    return {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in transformer_to_original(state).items()}


PROMPTS = ["a photo of a red cube on a table", "an oil painting of a lighthouse at dusk"]
SIGMAS = (0.25, 0.7)  # the transformer reads sigma x 1000, as sd-scripts' MMDiT does
TE_NAMES = ("text_encoder", "text_encoder_2")


def sd_scripts_width_transformer(seed: int = 1, attn2: bool = True) -> SD3Transformer2DModel:
    """The built-in transformer's config with 64-wide heads, one per block (sd-scripts' rule);
    without `attn2`, no MMDiT-X block (SD3.5 Large's topology)."""
    config = tiny_sd3_transformer_config()
    heads = config["num_layers"]
    config.update(attention_head_dim=64, num_attention_heads=heads, caption_projection_dim=64 * heads)
    if not attn2:
        config["dual_attention_layers"] = ()
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**config)


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def clip_outputs(encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What SD3 reads from a CLIP: the penultimate hidden states and the projected pooled output."""
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/sd3_check", help="folder for the files step 2 reads")
    parser.add_argument("--no-attn2", action="store_true",
                        help="no MMDiT-X self-attention (attn2) block: SD3.5 Large's topology")
    parser.add_argument("--builtin-transformer", action="store_true",
                        help="keep tiny-sd3's own transformer (sd-scripts' MMDiT cannot build it)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    pipe = load_pipeline("tiny-sd3")
    if not args.builtin_transformer:
        pipe.transformer = sd_scripts_width_transformer(attn2=not args.no_attn2)
    pipe.transformer.eval()
    transformer = pipe.transformer
    encoders = [getattr(pipe, n) for n in TE_NAMES]

    # Base weights, before any LoRA layer wraps them.
    base_state = plain_state(transformer)
    save_file(original_state_dict(base_state), work / "mmdit_base.safetensors")
    for i, encoder in enumerate(encoders, 1):
        save_file(plain_state(encoder), work / f"clip_{i}_base.safetensors")
        (work / f"clip_{i}_config.json").write_text(json.dumps(encoder.config.to_dict(), indent=1))
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    config["dual_attention_layers"] = list(config["dual_attention_layers"])
    (work / "mmdit_config.json").write_text(json.dumps(config, indent=1))

    add_lora(transformer, "transformer", ("attn", "ff", "adaln"), 4, 8.0)
    for name, encoder in zip(TE_NAMES, encoders):
        add_lora(encoder, name, ("attn", "mlp"), 4, 4.0)
    fill_lora_B([transformer, *encoders], seed=0, scale=0.1)
    # The adapted weights merged (W + scale B A per layer), original layout: where a prediction
    # differs, step 2 compares sd-scripts' merged weights with these, key by key.
    merged = dict(base_state)
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            merged[f"{name}.weight"] = merged[f"{name}.weight"] + module.get_delta_weight(ADAPTER_NAME)
    save_file(original_state_dict(merged), work / "mmdit_merged.safetensors")
    state = read_adapter_state({"transformer": transformer, **dict(zip(TE_NAMES, encoders))}, "sd3")
    save_adapter(state, work / "lora_kohya.safetensors", format="kohya", dtype=torch.float32)

    ids = tokenize_all(tokenizers_of(pipe), PROMPTS)  # (B, 3, 256): CLIP-L, CLIP-G, T5 rows
    cond = encode_all(text_encoders_of(pipe), ids)  # with the LoRA on both CLIPs
    t5_states = pipe.text_encoder_3(ids[:, 2])[0]
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(len(PROMPTS), 16, 8, 8, generator=gen)
    timesteps = torch.tensor(SIGMAS) * 1000
    with lora_weight([transformer], 0.0):  # the base's prediction, for diagnosis
        base_prediction = transformer(hidden_states=latents, timestep=timesteps,
                                      encoder_hidden_states=cond.hidden_states,
                                      pooled_projections=cond.pooled).sample
    prediction = transformer(hidden_states=latents, timestep=timesteps,
                             encoder_hidden_states=cond.hidden_states,
                             pooled_projections=cond.pooled).sample

    tensors = {"latents": latents, "timesteps": timesteps, "context": cond.hidden_states,
               "pooled": cond.pooled, "t5_states": t5_states, "prediction": prediction,
               "base_prediction": base_prediction,
               "clip_1_ids": ids[:, 0, :77].contiguous(), "clip_2_ids": ids[:, 1, :77].contiguous()}
    for i, encoder in enumerate(encoders, 1):
        tensors[f"clip_{i}_hidden"], tensors[f"clip_{i}_pooled"] = clip_outputs(encoder, ids[:, i - 1, :77])
    # The adapted CLIPs' outputs must be what the conditioning was made of.
    assert torch.equal(cond.pooled, torch.cat([tensors["clip_1_pooled"], tensors["clip_2_pooled"]], -1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, work / "reference.safetensors")

    counts = {c: len(m) for c, m in state.modules.items()}
    print(f"wrote {work}: LoRA modules {counts}; transformer hidden "
          f"{config['num_attention_heads'] * config['attention_head_dim']}, "
          f"{config['num_layers']} blocks; prediction {tuple(prediction.shape)}, "
          f"|prediction| max {prediction.abs().max():.4f}")


if __name__ == "__main__":
    main()

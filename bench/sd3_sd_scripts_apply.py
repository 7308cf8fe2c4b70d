"""Step 2 of the sd-scripts check: sd-scripts' own code applies sd-lora's SD3 kohya LoRA file.

    /path/to/sd-scripts-venv/bin/python bench/sd3_sd_scripts_apply.py \
        --sd-scripts /path/to/sd-scripts [--work /tmp/sd3_check]

Run in sd-scripts' env after step 1 (`sd3_sd_scripts_check.py`, see its docstring); imports
only torch, safetensors, transformers and sd-scripts, never sd_lora. The MMDiT is loaded by
`sd3_utils.load_mmdit` (which infers its parameters from the state dict with
`analyze_state_dict_state`), the CLIPs are transformers' CLIPTextModelWithProjection (what
sd-scripts' SD3 loaders build) from step 1's configs and base weights. The LoRA file goes
through `lora_sd3.create_network_from_weights(..., for_inference=True)` and is applied both
ways `sd3_minimal_inference.py` offers: `apply_to` then `load_state_dict(strict=True)` (forward
hooks), and `merge_to` (weights merged). The MMDiT is called as sd-scripts calls it:
`mmdit(x, t, context=..., y=pooled)` with t = sigma x 1000.

Compared with step 1's references (max |difference|): sd-scripts' merged MMDiT weights key by
key against W + scale B A; the CLIPs' penultimate states and projected pooled outputs; the
transformer's prediction, also end to end from conditioning built of sd-scripts' CLIP outputs.

MMDiT-X blocks (SD3.5 Medium's attn2): sd-scripts' `MMDiTBlock` hands `attn2.num_heads` to its
`attention(q, k, v, head_dim, ...)`, whose fourth argument is the head width (SAI's reference
`attention` takes the number of heads there), so attn2 runs depth-wide heads (SD3.5 Medium: 64
heads of 24 instead of 24 of 64; here 64 of 3). Its predictions then differ from diffusers' and
SAI's with or without any LoRA. The transformer rows are therefore given twice: as sd-scripts
runs (reported, not judged), and with attn2's heads split as SAI and diffusers do (in memory:
`attn2.num_heads` set to the head width, which is all that call reads it for), judged.
Exit status 1 when a judged row is past --tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

CLIP_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
             "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
             "attention_dropout", "initializer_range", "initializer_factor", "pad_token_id",
             "bos_token_id", "eos_token_id")


def load_mmdit(work: Path, sd3_utils):
    state = load_file(work / "mmdit_base.safetensors")
    width = state["x_embedder.proj.weight"].shape[0]
    if width % 64:
        sys.exit(f"sd-scripts cannot build this MMDiT: its hidden size is {width}, and sd-scripts' "
                 "MMDiT fixes hidden = 64 x depth with one 64-wide head per block (depth is read "
                 "as hidden // 64); rerun step 1 without --builtin-transformer")
    mmdit = sd3_utils.load_mmdit({f"model.diffusion_model.{k}": v for k, v in state.items()},
                                 torch.float32, "cpu")
    params = dict(mmdit.named_parameters()) | dict(mmdit.named_buffers())
    meta = [n for n, p in params.items() if p.is_meta]
    unused = sorted(set(state) - set(params))
    if meta or unused:
        sys.exit(f"MMDiT weights do not fit: left unloaded {meta}, unused {unused}")
    return mmdit.eval()


def attn2_blocks(mmdit) -> list:
    return [b.x_block.attn2 for b in mmdit.joint_blocks if b.x_block.x_block_self_attn]


def split_attn2_heads(mmdit, as_sai: bool) -> None:
    """attn2 with the head split of SAI's reference and diffusers, or back to sd-scripts' own
    (its blocks are built with num_heads = depth; see the module docstring)."""
    for attn2 in attn2_blocks(mmdit):
        attn2.num_heads = attn2.head_dim if as_sai else mmdit.num_heads


def load_clips(work: Path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    clips = []
    for i in (1, 2):
        config = json.loads((work / f"clip_{i}_config.json").read_text())
        clip = CLIPTextModelWithProjection(CLIPTextConfig(**{k: config[k] for k in CLIP_KEYS}))
        clip.load_state_dict(load_file(work / f"clip_{i}_base.safetensors"), strict=True)
        clips.append(clip.eval())
    return clips


def build(work: Path, sd3_utils, lora_sd3, how: str):
    """Fresh base models with the LoRA file applied by sd-scripts, `how` = apply or merge."""
    mmdit, clips = load_mmdit(work, sd3_utils), load_clips(work)
    text_encoders = [*clips, None]  # no T5 LoRA in the file: sd-scripts stops after the CLIPs
    file = str(work / "lora_kohya.safetensors")
    network, weights = lora_sd3.create_network_from_weights(
        1.0, file, None, text_encoders, mmdit, for_inference=True)
    names = sorted(lora.lora_name for lora in network.text_encoder_loras + network.unet_loras)
    in_file = sorted({k.split(".")[0] for k in weights})
    if names != in_file:
        sys.exit(f"sd-scripts made LoRA modules {set(names) ^ set(in_file)} differently from the file")
    if how == "apply":
        network.apply_to(text_encoders, mmdit)
        info = network.load_state_dict(weights, strict=True)
        assert not info.missing_keys and not info.unexpected_keys, info
        network.eval()
    else:
        network.merge_to(text_encoders, mmdit, weights)
    return network, mmdit, clips


def clip_outputs(clip, ids):
    """SD3's use of a CLIP in sd-scripts (strategy_sd3): out[0] (text_embeds) and hidden_states[-2]."""
    out = clip(ids, None, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd-scripts", default="/tmp/peerbench/src/sd-scripts",
                        help="sd-scripts checkout")
    parser.add_argument("--work", default="/tmp/sd3_check", help="step 1's folder")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()
    sys.path.insert(0, args.sd_scripts)
    from library import sd3_utils
    from networks import lora_sd3

    torch.set_num_threads(2)
    work = Path(args.work)
    ref = load_file(work / "reference.safetensors")
    x, t = ref["latents"], ref["timesteps"]
    rows = []  # (label, max |diff|, judged)

    base = load_mmdit(work, sd3_utils)
    has_attn2 = bool(attn2_blocks(base))
    variants = [("as sd-scripts runs", not has_attn2)]
    if has_attn2:
        variants.append(("attn2 heads as SAI/diffusers", True))

    def predictions(mmdit, label, **inputs):
        for variant, judged in variants:
            split_attn2_heads(mmdit, as_sai=variant.startswith("attn2"))
            pred = mmdit(x, t, context=inputs["context"], y=inputs["y"])
            rows.append((f"{label} [{variant}]", max_diff(pred, inputs["expected"]), judged))

    predictions(base, "base MMDiT, no LoRA", context=ref["context"], y=ref["pooled"],
                expected=ref["base_prediction"])
    for how in ("apply", "merge"):
        network, mmdit, clips = build(work, sd3_utils, lora_sd3, how)
        if how == "apply":
            scales = sorted({round(float(m.scale), 6) for m in network.unet_loras if "qkv" in m.lora_name})
            print(f"sd-scripts: {len(network.unet_loras)} MMDiT + {len(network.text_encoder_loras)} "
                  f"CLIP LoRA modules, all of the file's; fused qkv scale alpha / rows = {scales}; "
                  f"MMDiT-X (attn2) blocks: {len(attn2_blocks(mmdit))}")
        if how == "merge":  # sd-scripts' merged weights against W + scale B A from step 1
            expected = load_file(work / "mmdit_merged.safetensors")
            got = mmdit.state_dict()
            diffs = {k: max_diff(got[k], v) for k, v in expected.items()}
            rows.append(("merge: MMDiT weights, worst key", max(diffs.values()), True))
            for key, diff in sorted(diffs.items(), key=lambda kv: -kv[1])[:8]:
                if diff > args.tolerance:
                    print(f"  merged weight differs: {key} {tuple(got[key].shape)} max |diff| {diff:.3e}")
        hidden, pooled = [], []
        for i, clip in enumerate(clips, 1):
            h, p = clip_outputs(clip, ref[f"clip_{i}_ids"])
            rows.append((f"{how}: CLIP {i} penultimate states", max_diff(h, ref[f"clip_{i}_hidden"]), True))
            rows.append((f"{how}: CLIP {i} projected pooled", max_diff(p, ref[f"clip_{i}_pooled"]), True))
            hidden.append(h)
            pooled.append(p)
        # SD3's layout: the CLIP states side by side, zero-padded to T5's width, then T5's
        # states along the sequence (sd-scripts' concat_encodings pads to 4096, T5-XXL's width).
        t5 = ref["t5_states"]
        lg = torch.cat(hidden, -1)
        context = torch.cat([torch.nn.functional.pad(lg, (0, t5.shape[-1] - lg.shape[-1])), t5], 1)
        rows.append((f"{how}: conditioning from sd-scripts' CLIPs", max_diff(context, ref["context"]), True))
        predictions(mmdit, f"{how}: prediction", context=ref["context"], y=ref["pooled"],
                    expected=ref["prediction"])
        predictions(mmdit, f"{how}: prediction end to end", context=context, y=torch.cat(pooled, -1),
                    expected=ref["prediction"])

    print(f"reference |prediction| max {ref['prediction'].abs().max().item():.4f}")
    worst = 0.0
    for label, diff, judged in rows:
        worst = max(worst, diff) if judged else worst
        print(f"{label:70} {diff:.3e}{'' if judged else '  (not judged)'}")
    ok = worst <= args.tolerance
    print(("OK" if ok else "FAIL") + f": worst judged max |diff| {worst:.3e} (tolerance {args.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The toy base's pretraining script (`sd_lora.world.pretrain`): its caption augmentation, and
every stage chained end to end at a few steps each (the real recipe takes about an hour)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from sd_lora.world import pretrain
from sd_lora.world.styles import STYLES, TOY_STYLES
from tests.lora_helpers import TEST_THREADS


def test_made_up_words_are_never_a_trigger_word():
    rng = random.Random(0)
    prefixes = [pretrain.made_up_words(rng) for _ in range(2000)]
    counts = [p.count(", ") for p in prefixes]
    assert set(counts) == {1, 2, 3}
    words = [w for p in prefixes for w in p.split(", ") if w]
    assert all(w.isalpha() and w.islower() and 2 <= len(w) <= 9 for w in words)
    triggers = {STYLES[s].trigger for s in TOY_STYLES}
    assert all(t.startswith(pretrain.TRIGGER_PREFIX) for t in triggers)
    assert not any(w.startswith(pretrain.TRIGGER_PREFIX) for w in words)


def test_unknown_words_go_before_the_share_of_captions_asked_for():
    captions = [f"a red circle number {i}" for i in range(2000)]
    mixed = pretrain.with_unknown_words(captions, 0.5, random.Random(1))
    changed = [m != c for m, c in zip(mixed, captions)]
    assert abs(sum(changed) / len(captions) - 0.5) < 0.04
    assert all(m.endswith(", " + c) for m, c, x in zip(mixed, captions, changed) if x)
    assert pretrain.with_unknown_words(captions, 0.0, random.Random(1)) == captions


def test_a_stage_needs_its_start_weights(tmp_path):
    with pytest.raises(ValueError, match="start file"):
        pretrain.train_unet(pretrain.Recipe(), None, tmp_path / "x.safetensors", None,
                            "unknown_words")


def test_every_stage_runs_and_the_base_is_written(tmp_path):
    """A few steps of each stage, chained as the real recipe is, into a loadable toy base."""
    torch.set_num_threads(TEST_THREADS)
    work = tmp_path / "work"
    small = ["--vae-images", "16", "--vae-steps", "2", "--vae-batch", "4",
             "--unet-images", "16", "--unet-steps", "2", "--unet-batch", "4",
             "--unet-warmup", "1", "--finetune-steps", "2", "--unknown-words-steps", "2",
             "--eval-prompts", "2", "--threads", str(TEST_THREADS)]
    assert pretrain.main(["--work", str(work), *small]) == 0
    record = json.loads((work / "toy" / "recipe.json").read_text())
    for stage in ("vae", "unet", "offset_noise_finetune", "unknown_words_finetune", "evaluation"):
        assert "seconds" in record[stage], stage
    assert record["recipe"]["unknown_words_steps"] == 2
    assert record["evaluation"]["prompts"] == 2
    assert record["evaluation"]["after_two_trigger_words"]["prompts"] == 2
    offset = load_file(str(work / "unet_text_encoder_offset_noise_ema.safetensors"))
    words = load_file(str(work / "unet_text_encoder_unknown_words_ema.safetensors"))
    assert offset.keys() == words.keys()
    assert any(not torch.equal(offset[k], words[k]) for k in offset)  # the last stage trained

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(work / "toy", torch_dtype=torch.float32)
    assert pipe.unet.config.sample_size == 16

"""Pure, table-driven conversions between `AdapterState` and the tensors of adapter files.

- `kohya`: lora_unet_* / lora_te_* with lora_down, lora_up and alpha (A1111, ComfyUI, InvokeAI).
- `peft_diffusers`: unet.* / text_encoder.* with lora_A, lora_B and the LoRA config as metadata
  (`pipe.load_lora_weights`).
- `metadata`: the community `ss_*` / `modelspec.*` keys and the file hashes.

Reading and writing files is `sd_lora.adapters.files`'s job.
"""

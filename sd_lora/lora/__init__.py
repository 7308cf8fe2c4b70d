"""LoRA layers injected through PEFT into a pipeline's models, and sd-scripts' dropouts."""

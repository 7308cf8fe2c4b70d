"""The `sd-lora` command: argument parsing over the library."""

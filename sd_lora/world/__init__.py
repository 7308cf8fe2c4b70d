"""The toy world: procedural captioned scenes, the styles they can be drawn in, and scorers that
read colour, shape and style back from an image. The built-in `toy` base is pretrained on it
(`sd_lora.world.pretrain`) and its style datasets live in `datasets/toy/`."""

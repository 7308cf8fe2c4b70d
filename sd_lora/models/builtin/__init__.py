"""The built-in bases: `tiny` and `tiny-sdxl` (random weights, for tests) and `toy` (pretrained on
the toy world).
"""

"""A training run from start to finish: checks before anything loads, the loop, checkpoints,
exports and the quality report.
"""

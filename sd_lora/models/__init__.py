"""Base models: what a `--base` names, loading it from every source, its text conditioning, and the
built-in bases.
"""

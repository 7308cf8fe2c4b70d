"""Adapter files in every layout: read, written, applied to a pipeline, merged, resized, extracted,
inspected.
"""

"""What the browser app drives: its folders and path checks, a generation session, background
training jobs.
"""

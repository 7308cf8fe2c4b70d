"""Small helpers with no model code: atomic writes, dtype names, pickles, processes, console
phases, words.
"""

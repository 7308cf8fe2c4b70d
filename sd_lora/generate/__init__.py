"""Images from a base and adapters: one path for the CLI and the app, and the A1111 parameters
text.
"""

"""The library the pipeline's scripts share (the scripts a user runs stand at the repository's top).

Nothing here runs at import time, and torch and transformers are imported by the functions that
use them, so that every script's --help and option errors answer before they load.
"""

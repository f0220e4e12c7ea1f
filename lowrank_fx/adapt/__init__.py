"""From a model to an adapted graph and back: capture, plan (a dry run), rewrite, combining and
deleting adapters, and the merged state dict that the original model loads.

Read `rewrite.py` first: capture → find targets → resolve the spec → inject.
"""

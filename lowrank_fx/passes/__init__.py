"""Graph passes, one per file: each takes a GraphModule, changes it, and returns what it changed.

Capture runs `mode_aware`, `grad_regions` and `inline_linear`; `inject` adds adapters; `fold` removes them.
Read `inject.py` first.
"""

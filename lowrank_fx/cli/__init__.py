"""The `lowrank-fx` command line, where it gets models and data, and the demos.

Read `main.py` first. This wing sits on top: it uses the public API and nothing imports it.
"""

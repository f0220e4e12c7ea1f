"""Adapter methods, one file each: parameters, init, the update Δy, the dense ΔW, and counts.

Read `base.py` first (the Method / Unit / AdapterGroup interface), then `lora.py`.
"""

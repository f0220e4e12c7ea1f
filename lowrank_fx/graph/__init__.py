"""What we know about a captured graph: its linear-like targets, the record of adapters it holds,
the gates that switch them, and the mode-following modules it calls.

Read `targets.py` first: it finds the ops a method can adapt. Nothing here imports a higher wing.
"""

"""Adapters on disk: our safetensors adapter files, PEFT adapter directories, atomic writes.

Read `adapter_file.py` first; `into_graph.py` puts loaded values into a graph after every check passed.
"""

"""Generation with adapters: a KV-cache decode graph that shares a training graph's adapter
modules, `lfx.generate` in PyTorch, and (export.py, session.py) the ONNX decoder with
swappable adapter files for ONNX Runtime and onnxruntime-genai.

Read `decode_graph.py` first (the second capture and how adapters are shared), then
`loop.py`, the one token loop every runtime runs, and `beam.py`, its beam-search twin.
Sliding-window and chunked attention: decoder.py's docstring.
"""

from .export import GenerationExport, export_generation
from .loop import Generated
from .session import GenerationSession
from .torch_generate import generate

__all__ = ["Generated", "GenerationExport", "GenerationSession", "export_generation", "generate"]

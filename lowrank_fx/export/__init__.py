"""ONNX export and ONNX Runtime deployment: merged graphs, swappable adapters, per-row adapters.

Read `onnx.py` first (export_onnx and its three modes); `session.py` runs the result.
"""

from .onnx import OnnxExport, export_onnx, export_onnx_adapter
from .per_row import NONE_ID
from .session import AdapterSession

__all__ = ["NONE_ID", "AdapterSession", "OnnxExport", "export_onnx", "export_onnx_adapter"]

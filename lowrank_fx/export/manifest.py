"""The JSON sidecar of an exported model: `<model stem>.lowrank_fx.json` next to the .onnx.

It tells `AdapterSession` what the export holds, so users need not repeat it:

    {"format": "lowrank_fx.onnx", "version": 1,
     "mode": "merged" | "adapters" | "per_row",
     "inputs": ["input_ids", ...], "outputs": ["logits", ...],
     "adapter_inputs": ["model.layers.0.self_attn.q_proj.lora_A", ...],  # mode "adapters"
     "adapters": {"default": "model.default.onnx_adapter"},              # files, relative
     "row_adapters": ["a", "b"], "none_id": -1}                          # mode "per_row"

The sidecar is a convenience, not a trust anchor: adapter files are always checked against
the ONNX model itself (ort_adapter.check_adapter_file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ExportError

FORMAT = "lowrank_fx.onnx"
VERSION = 1


def manifest_path(model_path: str | os.PathLike) -> Path:
    path = Path(model_path)
    return path.with_name(path.stem + ".lowrank_fx.json")


def write_manifest(model_path: str | os.PathLike, content: dict) -> Path:
    path = manifest_path(model_path)
    data = {"format": FORMAT, "version": VERSION, **content}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_manifest(model_path: str | os.PathLike) -> dict:
    """The sidecar's content, or {} when the model has none (exported by other tools)."""
    path = manifest_path(model_path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path} is not valid JSON ({err}); it may be corrupt: export the model again") from None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else {}

"""lowrank_fx: parameter-efficient fine-tuning as a torch.fx graph pass."""

from .errors import (AdapterFileError, CaptureError, ExportError, LowRankFxError, MergeError, ModelTypeError,
                     SpecError, TargetError, TrainingError)
from .export import AdapterSession, OnnxExport, export_onnx, export_onnx_adapter
from .gates import active_adapters, set_active_adapters
from .io import load_adapters, save_adapters
from .methods.lora import LoRA
from .methods.lorta import LoRTA
from .methods.randlora import RandLoRA
from .passes.fold import fold as merge
from .peft_interop import load_peft, save_peft
from .plan import Plan, plan
from .rewrite import rewrite
from .spec import Spec
from .state import load_merged, merged_state_dict
from .train import loraplus_optimizer, loraplus_param_groups
from .trainer import Trainer

__all__ = [
    "LoRA", "Spec", "rewrite", "plan", "Plan", "merge", "merged_state_dict", "load_merged",
    "LoRTA", "RandLoRA", "loraplus_optimizer", "loraplus_param_groups",
    "save_adapters", "load_adapters", "load_peft", "save_peft",
    "LowRankFxError", "SpecError", "CaptureError", "TargetError", "MergeError", "ModelTypeError",
    "AdapterFileError",
    "export_onnx", "export_onnx_adapter", "OnnxExport", "AdapterSession", "ExportError",
    "set_active_adapters", "active_adapters", "Trainer", "TrainingError",
]
__version__ = "0.1.0"

"""lowrank_fx: parameter-efficient fine-tuning as a torch.fx graph pass."""

from .adapt.combine import combine_adapters
from .adapt.delete import delete_adapter
from .adapt.experts_impl import experts_implementation
from .adapt.merged_state import load_merged, merged_state_dict
from .adapt.plan import Plan, plan
from .adapt.quantize import quantize_base
from .adapt.rewrite import rewrite
from .errors import (AdapterFileError, CaptureError, ExportError, FileWriteError, InputError, LowRankFxError,
                     MergeError, ModelTypeError, QuantizedBaseError, SpecError, TargetError, TrainingError)
from .export import AdapterSession, OnnxExport, export_onnx, export_onnx_adapter
from .files.adapter_file import load_adapters, save_adapters
from .files.peft import load_peft, save_peft
from .generation import GenerationExport, GenerationSession, Generated, export_generation, generate
from .graph.disabled import adapters_disabled
from .graph.gates import active_adapters, set_active_adapters
from .methods.base import AdapterGroup, Method, Unit
from .methods.lora import LoRA
from .methods.lorta import LoRTA
from .methods.randlora import RandLoRA
from .methods.trainable_tokens import TrainableTokens
from .passes.checkpoint_layers import checkpoint_layers
from .passes.fold import fold as merge
from .passes.quantized_fold import RequantizeWarning
from .passes.row_gates import adapter_rows
from .spec import Spec
from .training.loraplus import loraplus_optimizer, loraplus_param_groups
from .training.trainer import Trainer
from .version import __version__

__all__ = [
    "LoRA", "Spec", "rewrite", "plan", "Plan", "merge", "merged_state_dict", "load_merged",
    "LoRTA", "RandLoRA", "TrainableTokens", "loraplus_optimizer", "loraplus_param_groups",
    "Method", "Unit", "AdapterGroup",
    "save_adapters", "load_adapters", "load_peft", "save_peft",
    "LowRankFxError", "SpecError", "CaptureError", "TargetError", "MergeError", "ModelTypeError",
    "AdapterFileError", "FileWriteError", "InputError",
    "export_onnx", "export_onnx_adapter", "OnnxExport", "AdapterSession", "ExportError",
    "set_active_adapters", "active_adapters", "Trainer", "TrainingError",
    "quantize_base", "QuantizedBaseError", "RequantizeWarning",
    "generate", "export_generation", "GenerationExport", "GenerationSession", "Generated",
    "checkpoint_layers", "experts_implementation",
    "combine_adapters", "delete_adapter", "adapters_disabled", "adapter_rows",
    "__version__",
]

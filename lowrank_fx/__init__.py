"""lowrank_fx: parameter-efficient fine-tuning as a torch.fx graph pass."""

from .adapt.combine import combine_adapters
from .adapt.delete import delete_adapter
from .adapt.experts_impl import experts_implementation
from .adapt.merged_state import load_merged, merged_state_dict
from .adapt.plan import Plan, plan
from .adapt.quantize import quantize_base
from .adapt.rewrite import rewrite
from .deprecation import LowRankFxDeprecationWarning
from .errors import (
                     AdapterFileError,
                     CaptureError,
                     ExportError,
                     FileWriteError,
                     InputError,
                     LowRankFxError,
                     MergeError,
                     ModelTypeError,
                     QuantizedBaseError,
                     SpecError,
                     TargetError,
                     TrainingError,
)
from .export import AdapterSession, OnnxExport, export_onnx, export_onnx_adapter
from .files.adapter_file import load_adapters, save_adapters
from .files.peft import load_peft, save_peft
from .generation import Generated, GenerationExport, GenerationSession, export_generation, generate
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
                     "AdapterFileError",
                     "AdapterGroup",
                     "AdapterSession",
                     "CaptureError",
                     "ExportError",
                     "FileWriteError",
                     "Generated",
                     "GenerationExport",
                     "GenerationSession",
                     "InputError",
                     "LoRA",
                     "LoRTA",
                     "LowRankFxDeprecationWarning",
                     "LowRankFxError",
                     "MergeError",
                     "Method",
                     "ModelTypeError",
                     "OnnxExport",
                     "Plan",
                     "QuantizedBaseError",
                     "RandLoRA",
                     "RequantizeWarning",
                     "Spec",
                     "SpecError",
                     "TargetError",
                     "TrainableTokens",
                     "Trainer",
                     "TrainingError",
                     "Unit",
                     "__version__",
                     "active_adapters",
                     "adapter_rows",
                     "adapters_disabled",
                     "checkpoint_layers",
                     "combine_adapters",
                     "delete_adapter",
                     "experts_implementation",
                     "export_generation",
                     "export_onnx",
                     "export_onnx_adapter",
                     "generate",
                     "load_adapters",
                     "load_merged",
                     "load_peft",
                     "loraplus_optimizer",
                     "loraplus_param_groups",
                     "merge",
                     "merged_state_dict",
                     "plan",
                     "quantize_base",
                     "rewrite",
                     "save_adapters",
                     "save_peft",
                     "set_active_adapters",
]

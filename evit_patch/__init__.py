"""evit_patch: EViT token reorganization for pretrained vision transformers, by a torch.fx pass.

import timm, evit_patch
fast = evit_patch.apply(timm.create_model("deit_small_patch16_224", pretrained=True),
                        layers=[3, 6, 9], keep=0.7)
print(evit_patch.explain(fast))
"""

from .apply import apply
from .budget import plan
from .calibrate import CalibrationResult, calibrate
from .config import EViTConfig
from .errors import CheckpointError, EViTError, InvalidPlanError, UnsupportedInputError, UnsupportedModelError
from .explain import Explanation, explain
from .export import export_onnx, export_program
from .families import list_supported, register_family
from .hub import push_to_hub
from .options import Method, Score
from .persist import load_pretrained, save_pretrained
from .reorganize import (
    cls_attention_from_probs,
    cls_attention_from_qk,
    num_kept,
    received_attention_from_probs,
    received_attention_from_qk,
    reorganize,
)
from .reorganizer import TokenReorganizer
from .state import get_config, is_patched, reorganizers, set_keep
from .tracking import TokenTrace, track_tokens
from .visualize import visualize

__version__ = "0.1.0"

__all__ = [
    "CalibrationResult",
    "CheckpointError",
    "EViTConfig",
    "EViTError",
    "Explanation",
    "InvalidPlanError",
    "Method",
    "Score",
    "TokenReorganizer",
    "UnsupportedInputError",
    "UnsupportedModelError",
    "apply",
    "calibrate",
    "cls_attention_from_probs",
    "cls_attention_from_qk",
    "explain",
    "export_onnx",
    "export_program",
    "get_config",
    "is_patched",
    "list_supported",
    "load_pretrained",
    "num_kept",
    "plan",
    "push_to_hub",
    "received_attention_from_probs",
    "received_attention_from_qk",
    "register_family",
    "reorganize",
    "reorganizers",
    "save_pretrained",
    "set_keep",
    "TokenTrace",
    "track_tokens",
    "visualize",
]

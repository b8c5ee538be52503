"""evit_patch: EViT token reorganization for pretrained vision transformers, by a torch.fx pass.

import timm, evit_patch
fast = evit_patch.apply(timm.create_model("deit_small_patch16_224", pretrained=True),
                        layers=[3, 6, 9], keep=0.7)
print(evit_patch.explain(fast))
"""

from .analysis.tracking import TokenTrace, track_tokens
from .analysis.visualize import visualize
from .config import EViTConfig, PlanOptions
from .deploy.export import export_onnx, export_program
from .deploy.hub import push_to_hub
from .deploy.persist import load_pretrained, save_pretrained
from .errors import (
    CheckpointError,
    EViTError,
    InvalidPlanError,
    UnsupportedInputError,
    UnsupportedModelError,
    VerificationError,
)
from .families import list_supported, register_family
from .graph.reorganizer import TokenReorganizer
from .graph.state import get_config, is_patched, reorganizers, restore, set_keep, split_state
from .options import Method, Pool, Score
from .pipeline import apply
from .planning.budget import plan
from .planning.calibrate import CalibrationResult, calibrate
from .planning.explain import Explanation, explain
from .reductions import Mix, Reduction, list_reductions, num_kept, register_reduction, reorganize
from .scores import (
    cls_attention_from_probs,
    cls_attention_from_qk,
    received_attention_from_probs,
    received_attention_from_qk,
)
from .version import __version__  # noqa: F401  (evit_patch.__version__)

__all__ = [
    "CalibrationResult",
    "CheckpointError",
    "EViTConfig",
    "EViTError",
    "Explanation",
    "InvalidPlanError",
    "Method",
    "Mix",
    "PlanOptions",
    "Pool",
    "Reduction",
    "Score",
    "TokenReorganizer",
    "UnsupportedInputError",
    "UnsupportedModelError",
    "VerificationError",
    "apply",
    "calibrate",
    "cls_attention_from_probs",
    "cls_attention_from_qk",
    "explain",
    "export_onnx",
    "export_program",
    "get_config",
    "is_patched",
    "list_reductions",
    "list_supported",
    "load_pretrained",
    "num_kept",
    "plan",
    "push_to_hub",
    "received_attention_from_probs",
    "received_attention_from_qk",
    "register_family",
    "register_reduction",
    "reorganize",
    "reorganizers",
    "save_pretrained",
    "set_keep",
    "restore",
    "split_state",
    "TokenTrace",
    "track_tokens",
    "visualize",
]

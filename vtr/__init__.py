"""vtr: visual token reduction for vision transformers and vision-language models.

    import timm, vtr
    model = vtr.patch(timm.create_model("vit_base_patch16_224"), "pitome", flops=0.5)
"""
from . import adapters, kernels, reducers
from .adapters import UnsupportedModelError
from . import clip  # text-conditioned CLIP helpers: vtr.clip.text_query, vtr.clip.zero_shot
from .api import conditioned, expected_flops, expected_tokens, is_patched, make_reducer, methods, patch, report, unpatch
from .config import Reduction, Report
from .profile import profile_model
from .visualization import visualize
from .reducers import Reducer, Signals
from .schedule import Schedule
from .state import TokenState

__version__ = "0.1.0"

__all__ = [
    "patch", "unpatch", "conditioned", "methods", "report", "is_patched", "make_reducer", "expected_tokens",
    "expected_flops", "TokenState", "Reducer", "Signals", "Schedule", "Reduction", "Report",
    "UnsupportedModelError", "adapters", "kernels", "reducers", "clip", "profile_model", "visualize",
]

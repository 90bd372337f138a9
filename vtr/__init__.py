"""vtr: visual token reduction for vision transformers and vision-language models.

    import timm, vtr
    model = vtr.patch(timm.create_model("vit_base_patch16_224"), "pitome", flops=0.5)

The facade: the only module that imports every layer (core, reducers, budget, adapters, api, tools).
"""
from . import adapters, adaptive, compression, kernels, losses, reducers
from ._version import __version__
from .adapters import UnsupportedModelError, family
from .api import conditioned, expected_flops, expected_tokens, is_patched, make_reducer, method_table, methods, patch, report, unpatch
from .budget.schedule import Schedule
from .compression import compress, compressions
from .core import Need, Reduction, Report, Signals, TokenState
from .reducers import Reducer
from .training import decisions, disabled, trainable
from .tools import clip  # text-conditioned CLIP helpers: vtr.clip.text_query, vtr.clip.zero_shot
from .tools import zoo
from .tools.profile import profile_model
from .tools.saving import load_reduction, save_reduction
from .tools.visualize import visualize

__all__ = [
    "patch", "unpatch", "conditioned", "methods", "method_table", "report", "is_patched", "make_reducer", "expected_tokens",
    "expected_flops", "family", "disabled", "trainable", "decisions", "losses", "TokenState", "Reducer", "Signals", "Need", "Schedule", "Reduction", "Report",
    "UnsupportedModelError", "adapters", "adaptive", "kernels", "reducers", "clip", "zoo", "profile_model", "visualize",
    "save_reduction", "load_reduction", "compress", "compressions", "compression",
]

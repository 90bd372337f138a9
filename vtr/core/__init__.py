"""Core: the token state, the signals a reducer reads, a patched model's settings and its per-call run."""
from .plan import METRICS, Reduction
from .run import Report, Run
from .signals import Instruction, Need, Signals, cls_attention, needs
from .state import TokenState

__all__ = ["METRICS", "Reduction", "Report", "Run", "Instruction", "Need", "Signals", "cls_attention", "needs", "TokenState"]

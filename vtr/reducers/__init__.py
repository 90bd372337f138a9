"""Reducers: model-agnostic modules that turn a token state into a smaller one."""
from .base import REDUCERS, Reducer, Signals, check_budget, dest_from_choice
from . import baselines, fastv, merge  # noqa: F401  (registers the methods)
from .baselines import NoReduction, RandomDrop
from .merge import PiToMe, ToMe

__all__ = ["REDUCERS", "Reducer", "Signals", "check_budget", "dest_from_choice",
           "NoReduction", "RandomDrop", "PiToMe", "ToMe"]

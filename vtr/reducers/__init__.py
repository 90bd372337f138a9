"""Reducers: model-agnostic modules that turn a token state into a smaller one."""
from .base import REDUCERS, Reducer, Signals, check_budget, dest_from_choice
from . import (atf, baselines, cdpruner, dart, drop, dynamicvit, fastv, merge, pool,  # noqa: F401  (registers the methods)
               pyramiddrop, query, sit, sparsevlm, video)
from .atf import ATF
from .baselines import NoReduction, RandomDrop
from .cdpruner import CDPruner
from .dart import DART
from .drop import EViT, HiRED
from .dynamicvit import DynamicViT
from .fastv import FastV
from .merge import PiToMe, ToMe
from .pool import GridPool
from .pyramiddrop import PyramidDrop
from .query import QueryPrune
from .sit import SiT
from .sparsevlm import SparseVLM
from .video import TemporalMerge

__all__ = ["REDUCERS", "Reducer", "Signals", "check_budget", "dest_from_choice",
           "NoReduction", "RandomDrop", "PiToMe", "ToMe", "EViT", "HiRED", "ATF", "QueryPrune", "GridPool", "FastV", "PyramidDrop", "CDPruner", "DART", "SparseVLM",
           "TemporalMerge", "DynamicViT", "SiT"]

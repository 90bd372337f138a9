"""Reducers: model-agnostic modules that turn a token state into a smaller one."""
from .base import REDUCERS, Reducer, Signals, check_budget, dest_from_choice
from . import (atf, baselines, cdpruner, dart, divprune, drop, dynamicvit, fastervlm, fastv, feather,  # noqa: F401
               merge, pool, pyramiddrop, query, sit, sparsevlm, video, visionzip, vispruner)  # (registers the methods)
from .atf import ATF
from .baselines import NoReduction, RandomDrop
from .cdpruner import CDPruner
from .dart import DART
from .drop import EViT, HiRED
from .divprune import DivPrune
from .dynamicvit import DynamicViT
from .fastervlm import FasterVLM
from .fastv import FastV
from .feather import Feather
from .merge import PiToMe, ToMe
from .pool import GridPool
from .pyramiddrop import PyramidDrop
from .query import QueryPrune
from .sit import SiT
from .sparsevlm import SparseVLM
from .video import TemporalMerge
from .visionzip import VisionZip
from .vispruner import VisPruner

__all__ = ["REDUCERS", "Reducer", "Signals", "check_budget", "dest_from_choice",
           "NoReduction", "RandomDrop", "PiToMe", "ToMe", "EViT", "HiRED", "ATF", "QueryPrune", "GridPool", "FastV",
           "TemporalMerge", "DynamicViT", "SiT", "VisionZip", "DivPrune", "VisPruner", "FasterVLM", "PyramidDrop",
           "CDPruner", "DART", "SparseVLM", "Feather"]

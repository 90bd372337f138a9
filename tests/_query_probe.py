"""A tiny query-conditioned reducer for testing the adapters' conditioning plumbing.

The real query reducer lives in another branch; this one keeps the tokens most similar (cosine,
max over query tokens) to the query after the adapter's ``query_projection``, and logs the signals
it saw. Register it with the ``probe`` context manager; it is removed afterwards.
"""
from contextlib import contextmanager

import torch

from vtr.reducers import REDUCERS, Reducer, check_budget, dest_from_choice
from vtr.reducers.base import unit


class QueryProbe(Reducer):
    name = "query_probe"
    description = "test-only: keep the tokens closest to the query"
    needs = frozenset({"query"})
    seen: list = []

    def forward(self, state, num_kept, signals):
        check_budget(self, state, num_kept)
        QueryProbe.seen.append(signals)
        if num_kept == state.num_tokens:
            return state
        protected = state.num_protected
        tokens = signals.query_projection(state.x) if signals.query_projection is not None else state.x
        query = signals.query if signals.query.dim() == 3 else signals.query[:, None]
        score = (unit(tokens[:, protected:]) @ unit(query).transpose(1, 2)).amax(dim=-1)
        kept = score.topk(num_kept - protected, dim=1).indices.sort(dim=1).values
        return state.reduce(dest_from_choice(state, kept), num_kept)


@contextmanager
def probe():
    REDUCERS[QueryProbe.name] = QueryProbe
    QueryProbe.seen = []
    try:
        yield QueryProbe
    finally:
        del REDUCERS[QueryProbe.name]
        QueryProbe.seen = []


class SignalProbe(Reducer):
    """Test-only: asks for CLS attention, logs the signals, keeps the first ``num_kept`` tokens."""

    name = "signal_probe"
    description = "test-only: log signals, keep the leading tokens"
    needs = frozenset({"cls_attention", "metric"})
    seen: list = []

    def forward(self, state, num_kept, signals):
        check_budget(self, state, num_kept)
        SignalProbe.seen.append(signals)
        kept = torch.arange(num_kept - state.num_protected, device=state.x.device).expand(state.x.shape[0], -1)
        return state.reduce(dest_from_choice(state, kept), num_kept)


@contextmanager
def signal_probe():
    REDUCERS[SignalProbe.name] = SignalProbe
    SignalProbe.seen = []
    try:
        yield SignalProbe
    finally:
        del REDUCERS[SignalProbe.name]
        SignalProbe.seen = []

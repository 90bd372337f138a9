"""Errors adapters raise; exported as vtr.UnsupportedModelError."""


class UnsupportedModelError(TypeError):
    """The model (or one of its blocks) is not one vtr can reduce without changing what it computes."""

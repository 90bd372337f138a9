"""What the VLM benchmark prompts of every family share."""
from __future__ import annotations


def text_ids(count: int, below: int) -> list:
    """``count`` ordinary token ids (none of the model's special ones, which all lie at or above ``below``)."""
    return [1 + i % (below - 2) for i in range(count)]

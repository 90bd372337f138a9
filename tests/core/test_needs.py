"""Reducer.needs is a closed set of signal names: a typo is an error when the class is defined."""
import pytest

import vtr
from vtr import Need, Reducer


def test_a_misspelt_need_is_an_error_at_class_definition():
    with pytest.raises(TypeError, match=r"Typo\.needs: unknown signal 'cls_atention'.*cls_attention"):
        class Typo(Reducer):
            needs = frozenset({"cls_atention"})


def test_needs_are_converted_to_the_enum_and_compare_as_strings():
    class Reads(Reducer):
        needs = frozenset({"metric", Need.CLS_ATTENTION})

    assert Reads.needs == frozenset({Need.METRIC, Need.CLS_ATTENTION})
    assert "cls_attention" in Reads.needs and Need.METRIC in Reads.needs


def test_every_registered_method_needs_only_known_signals():
    for name in vtr.methods():
        reducer = vtr.make_reducer(name)
        assert all(isinstance(need, Need) for need in reducer.needs), name

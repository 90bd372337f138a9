"""``vtr.methods()``: the plain dict existing callers read, the details (stages, needs, paper) behind it, and the
README's method table, which is ``vtr.method_table()`` verbatim."""
import pathlib

import pytest

import vtr
from vtr.reducers import REDUCERS, Reducer
from vtr.reducers.base import STAGES

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_table_is_the_generated_one():
    text = README.read_text()
    start = text.index("<!-- method table: vtr.method_table() -->\n") + len("<!-- method table: vtr.method_table() -->\n")
    end = text.index("<!-- end of method table -->")
    assert text[start:end] == vtr.method_table(), "README's method table is stale: paste vtr.method_table()"


def test_methods_stays_a_dict_of_descriptions():
    plain = vtr.methods()
    assert plain == {name: cls.description for name, cls in sorted(REDUCERS.items())}
    assert all(isinstance(v, str) for v in plain.values())


def test_details_say_stage_needs_and_paper():
    details = vtr.methods(details=True)
    assert list(details) == list(vtr.methods())
    assert details["sit"].stages == ("tower",) and details["sit"].training and not details["sit"].attention
    assert details["dynamicvit"].training and details["dynamicvit"].attention
    assert details["query"].query and not details["query"].attention and not details["query"].training
    assert details["fastv"].stages == STAGES and "2403.06764" in details["fastv"].paper
    assert details["dart"].query and not details["dart"].attention                  # reads the prompt's text, keys
    assert details["sparsevlm"].query and details["sparsevlm"].attention            # the text raters' attention
    for name, info in details.items():
        assert info.stages and set(info.stages) <= set(STAGES), name
        assert info.description == vtr.methods()[name]
        # a method from a paper cites it with an arXiv id; the plain baselines cite none
        assert ("arXiv" in info.paper) == (name not in {"none", "random", "pool"}), name


def test_stages_are_checked_when_a_reducer_is_defined():
    with pytest.raises(TypeError, match=r"Wrong\.stages must be a non-empty subset of \('tower', 'before_lm', "
                                        r"'in_lm'\), got \('in_llm',\)"):
        class Wrong(Reducer):
            stages = ("in_llm",)

    class Unordered(Reducer):
        stages = ("in_lm", "tower")

    assert Unordered.stages == ("tower", "in_lm")

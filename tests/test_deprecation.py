"""The old spellings of the API still work for one release, each with a warning naming the new one."""

import inspect

import pytest

from lowrank_fx.deprecation import LowRankFxDeprecationWarning, api_options


@api_options(positional=2, renamed={"model": "model_path"})
def _target(a, b, *, c=3, d=4, model_path=None):
    """A stand-in public function."""
    return a, b, c, d, model_path


def test_new_spelling_is_silent(recwarn):
    assert _target(1, 2, d=5, model_path="m.onnx") == (1, 2, 3, 5, "m.onnx")
    assert not [w for w in recwarn if issubclass(w.category, LowRankFxDeprecationWarning)]


def test_old_positional_options_map_to_keywords_in_order():
    with pytest.warns(LowRankFxDeprecationWarning, match=r"pass c, d as keyword arguments \(c=\.\.\., d=\.\.\.\)"):
        assert _target(1, 2, 7, 8) == (1, 2, 7, 8, None)


def test_old_keyword_is_renamed():
    with pytest.warns(LowRankFxDeprecationWarning, match="model= is now model_path="):
        assert _target(1, 2, model="x.onnx") == (1, 2, 3, 4, "x.onnx")


def test_conflicts_and_too_many_arguments_are_refused():
    with pytest.raises(TypeError, match="got 'c' both positionally and as a keyword"):
        _target(1, 2, 7, c=9)
    with pytest.raises(TypeError, match="both model= .* and model_path="):
        _target(1, 2, model="a", model_path="b")
    with pytest.raises(TypeError, match="takes 2 positional arguments"):
        _target(1, 2, 3, 4, 5, 6)


def test_signature_is_the_new_one():
    assert str(inspect.signature(_target)) == "(a, b, *, c=3, d=4, model_path=None)"

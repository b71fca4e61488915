"""Issue 22: every router declares its options once (`Router.options`, typed `option()` fields with bounds
and choices); the constructor, the grid validator and `moebench routers --options` all read that one
declaration, so a bad value gets the same words wherever it is given."""

import inspect

import pytest

from moebench.core.config import OptionError
from moebench.core.registry import ROUTERS
from moebench.grids.schema import GridError, load

D, E = 256, 8


def _bad_value(f):
    """A value the declaration refuses: below (or at a strict) minimum, above a maximum, not a choice."""
    m = f.metadata
    if m["kind"] in ("int", "float"):
        if m["minimum"] is not None:
            return m["minimum"] if m["strict"] else m["minimum"] - 1
        if m["maximum"] is not None:
            return m["maximum"] + 1
        return "many"
    return {"choice": "no-such-choice", "bool": "maybe", "indices": "0,1", "str": ""}[m["kind"]]


@pytest.mark.parametrize("name", ROUTERS.builtin_names())
def test_declaration_is_the_constructors_keywords_with_their_defaults(name):
    cls = ROUTERS.get(name)
    params = inspect.signature(cls.__init__).parameters
    keywords = [p for p in params if p not in ("self", "d_model", "num_experts")]
    assert list(cls.options) == keywords, f"{name}: declare every constructor option, in order"
    for key in keywords:
        default, declared = params[key].default, cls.options[key].default
        assert declared == default and type(declared) is type(default), (name, key)
        assert cls.options[key].metadata["doc"] or cls.options[key].metadata["fix"], (name, key, "say what it does")


@pytest.mark.parametrize("name", ROUTERS.builtin_names())
def test_defaults_are_accepted_and_each_bad_value_is_refused_naming_the_option(name):
    cls = ROUTERS.get(name)
    cls(D, E)
    for key, f in cls.options.items():
        bad = _bad_value(f)
        with pytest.raises(OptionError) as err:
            cls(D, E, **{key: bad})
        text = str(err.value)
        assert text.startswith(f"router {name!r}: args.{key}: expected "), text
        assert f"got {bad!r}" in text, text


@pytest.mark.parametrize("name", ["softmax-topk", "switch", "ermoe", "top-p"])
def test_the_grid_validator_refuses_a_bad_router_arg_with_the_same_words(name):
    cls = ROUTERS.get(name)
    key, f = next((k, f) for k, f in cls.options.items() if f.metadata["kind"] in ("int", "float", "choice"))
    bad = _bad_value(f)
    with pytest.raises(OptionError) as in_python:
        cls(D, E, **{key: bad})
    grid = {"task": "toy", "routers": ["dense", {"name": name, "label": "r", "args": {key: bad}}]}
    with pytest.raises(GridError) as in_grid:
        load(grid, file="g.yaml")
    assert str(in_grid.value) == f"g.yaml: routers[1].args.{key}: {in_python.value.describe()}"


def test_a_swept_router_arg_is_checked_against_each_router_that_declares_it():
    grid = {"task": "toy", "routers": ["dense", "hash", "softmax-topk"], "sweep": {"router_args.top_k": [1, 0]}}
    with pytest.raises(GridError) as err:
        load(grid, file="g.yaml")
    assert str(err.value) == (
        "g.yaml: sweep.router_args.top_k[1]: expected an integer >= 1, got 0 (int) (router 'hash', routers[1])"
    )


def test_grid_router_args_are_checked_but_kept_as_written():
    """The spec (and the run id) records the args as written; the constructor gets them normalised."""
    g = load({"task": "toy", "routers": [{"name": "softmax-topk", "args": {"top_k": 2.0, "balance_weight": "1e-2"}}]})
    assert g["routers"][0]["args"] == {"top_k": 2.0, "balance_weight": "1e-2"}
    r = ROUTERS.get("softmax-topk")(D, E, top_k=2.0, balance_weight="1e-2")
    assert r.top_k == 2 and isinstance(r.top_k, int) and r.balance_weight == 0.01


def test_cross_field_checks_stay_in_the_constructor():
    with pytest.raises(ValueError, match=r"top_k=9 is invalid for num_experts=8"):
        ROUTERS.get("softmax-topk")(D, E, top_k=9)
    with pytest.raises(ValueError, match=r"num_groups=3 must be a positive divisor of num_experts=8"):
        ROUTERS.get("deepseek-v3")(D, E, num_groups=3)


def test_routers_options_command_prints_the_declaration(capsys):
    from moebench.cli import main

    assert main(["routers", "--options", "switch"]) == 0
    out = capsys.readouterr().out
    assert "jitter" in out and "a number >= 0 and < 1" in out and "capacity_factor" in out
    assert main(["routers", "--options", "switch-typo"]) == 2
    assert "Did you mean 'switch'" in capsys.readouterr().err

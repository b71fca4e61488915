"""Registry: decorator registration, lookup errors that list the known names, entry-point plugins."""
import pytest

from moebench.core import registry as R
from moebench.core.routing import Router


def _fresh(monkeypatch, eps=()):
    monkeypatch.setattr(R, "entry_points", lambda group: [ep for ep in eps if ep.group == group])
    return R.Registry("router", "moebench.routers", "moebench.routers")


class _FakeEntryPoint:
    def __init__(self, name, group, obj):
        self.name, self.group, self.obj = name, group, obj

    def load(self):
        return self.obj


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(R.UnknownNameError) as err:
        R.ROUTERS.get("swich")
    msg = str(err.value)
    assert "unknown router 'swich'" in msg and "Did you mean 'switch'?" in msg
    assert "softmax-topk" in msg and "ermoe" in msg  # the built-ins were loaded and listed


def test_a_third_party_router_arrives_through_the_entry_point_group(monkeypatch):
    class PluginRouter(Router):
        """A router shipped by another package."""

    reg = _fresh(monkeypatch, [_FakeEntryPoint("plugin-router", "moebench.routers", PluginRouter),
                               _FakeEntryPoint("not-mine", "moebench.tasks", object)])
    assert reg.get("plugin-router") is PluginRouter
    assert "not-mine" not in reg.names()
    assert "plugin-router" not in reg.builtin_names()  # shipped routers only
    assert "softmax-topk" in R.ROUTERS.builtin_names()
    assert dict(reg.describe())["plugin-router"] == "A router shipped by another package."


def test_names_must_be_kebab_case_and_unique(monkeypatch):
    reg = _fresh(monkeypatch)
    with pytest.raises(ValueError, match="kebab-case"):
        reg.register("Bad_Name")

    @reg.register("twice")
    class A:
        pass

    with pytest.raises(ValueError, match="registered twice"):
        @reg.register("twice")
        class B:
            pass

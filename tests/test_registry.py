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

    reg = _fresh(
        monkeypatch,
        [
            _FakeEntryPoint("plugin-router", "moebench.routers", PluginRouter),
            _FakeEntryPoint("not-mine", "moebench.tasks", object),
        ],
    )
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


def test_the_registries_refuse_what_is_not_a_router_or_a_task_with_the_reason():
    from moebench.core.task import Task

    with pytest.raises(
        TypeError,
        match=r"router 'not-a-router' must be a subclass of moebench\.core\.routing\.Router"
        r".*got class .*NotARouter",
    ):

        @R.register_router("not-a-router")
        class NotARouter:
            pass

    with pytest.raises(TypeError, match=r"task 'a-router' must be a subclass of moebench\.core\.task\.Task"):
        R.register_task("a-router")(Router)
    with pytest.raises(TypeError, match=r"got function"):
        R.register_router("a-function")(lambda x: x)
    assert "not-a-router" not in R.ROUTERS and "a-router" not in R.TASKS

    class RealTask(Task):
        pass

    tasks = R.Registry("task", "moebench.tasks", "none", base="moebench.core.task:Task")
    assert tasks.register("a-real-task")(RealTask) is RealTask  # a subclass is accepted


def test_the_router_contract_is_declared_on_the_base_class():
    """What the layer, trainer, tasks and grid read from a router class is a documented class attribute."""
    for attr, default in (("needs_context", False), ("image_level", False), ("version", 1)):
        assert getattr(Router, attr) == default
    assert not hasattr(Router, "token_choice")
    with pytest.raises(NotImplementedError, match="token router"):
        Router.build_model(None, {})
    for name in R.ROUTERS.builtin_names():
        cls = R.ROUTERS.get(name)
        assert cls.image_level == ("build_model" in vars(cls)), name  # image-level routers, and only they, build

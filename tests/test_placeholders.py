"""Shipped grids keep `/path/to/...` placeholders for data and weights; nothing may plan or run on
them. `run`, `run --dry-run` and `grid show` refuse, naming each key and the file, and `--set` gives a
value without editing the shipped file (issue 13)."""

import re

import pytest
import yaml

from moebench.cli import main
from moebench.grids import schema
from moebench.grids.schema import GridError


def _placeholder_values(path):
    """The /path/to values on uncommented lines of the file, read as text (not through the schema)."""
    out = set()
    for line in path.read_text().splitlines():
        code = line.split("#", 1)[0]
        out.update(m.group(0) for m in re.finditer(r"/path/to/[^\s,}\]]+", code))
    return out


SHIPPED = [p for p in sorted(schema.GRIDS_DIR.glob("*.yaml")) if _placeholder_values(p)]


def test_some_shipped_grids_have_placeholders():
    assert {p.stem for p in SHIPPED} >= {"imagenet", "retrieval-coco-flickr", "brain-age"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_placeholder_is_refused_with_its_key_and_the_file(path):
    with pytest.raises(GridError) as err:
        schema.load(path.stem)
    msg = str(err.value)
    assert str(path) in msg and "--set" in msg and "cp " in msg
    listed = dict(re.findall(r"^  (\S+)\s+(/path/to/\S+)$", msg, flags=re.M))
    assert set(listed.values()) == _placeholder_values(path)
    raw = yaml.safe_load(path.read_text())
    for key, value in listed.items():  # each listed key really holds that placeholder
        node = raw
        for part in re.findall(r"[^.\[\]]+", key):
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert node == value
    # setting all but one still names the one left; setting all of them loads
    keys = list(listed)
    for left in keys:
        with pytest.raises(GridError, match=re.escape(left)):
            schema.load(path.stem, overrides=[f"{k}=/data/x" for k in keys if k != left])
    dotted = [re.sub(r"\[(\d+)\]", r".\1", k) for k in keys]  # tasks[0].x and tasks.0.x both work
    g = schema.load(path.stem, overrides=[f"{k}=/data/x" for k in dotted])
    assert "/path/to/" not in repr([b["task_args"] for b in g["tasks"]] + [b["model"] for b in g["tasks"]])


@pytest.mark.parametrize("argv", [["run", "imagenet", "--dry-run"], ["run", "imagenet"], ["grid", "show", "imagenet"]])
def test_the_commands_refuse_before_planning_anything(argv, capsys, tmp_path):
    assert main([*argv, *(["--results", str(tmp_path)] if argv[0] == "run" else [])]) == 2
    err = capsys.readouterr().err
    assert "task_args.data  /path/to/imagenet" in err and "imagenet.yaml" in err
    assert "moebench run imagenet --set task_args.data=" in err
    assert not any(tmp_path.iterdir())  # nothing planned, nothing written


def test_set_reaches_nested_keys_and_does_not_leak_through_yaml_aliases():
    raw = yaml.safe_load("tasks:\n  - {task: toy, model: &m {dim: 16}}\n  - {task: toy, model: *m}\nrouters: [dense]\n")
    assert raw["tasks"][0]["model"] is raw["tasks"][1]["model"]
    g = schema.load(raw, overrides=["tasks.0.model.dim=32", "executor.sbatch_extra.account=proj"])
    assert [b["model"]["dim"] for b in g["tasks"]] == [32, 16]
    assert g["executor"]["sbatch_extra"] == {"account": "proj"}


@pytest.mark.parametrize(
    "bad,match",
    [
        ("task_args.data", "expected KEY=VALUE"),
        ("tasks.5.task_args.root=/x", r"tasks\[5\] does not exist"),
        ("seeds.x=1", "not a mapping"),
        ("tasks[0.x=1", "dotted path"),
    ],
)
def test_bad_set_is_explained(bad, match):
    raw = {"tasks": [{"task": "toy"}], "seeds": [0]}
    with pytest.raises(GridError, match=match):
        schema.load(raw, overrides=[bad])

"""No configuration field is silently ignored.

Every leaf field of ``PipelineConfig`` (and of every registered operator spec) is either read by the
code that runs (an attribute access of that name outside the config definitions), refused with a
message naming it where it cannot apply, or documented as informational in its model. A field that
nothing reads (like ``distill_train.lr`` once was) fails here.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
from pydantic import BaseModel

from rsd_cli.pipeline_cmd import check_local_resources
from rsd_core.config import OperatorSpecBase, PipelineConfig
from rsd_core.kinds import get_kind, registered_kinds
from rsd_core.presets import ConfigError, build_config

ROOT = Path(__file__).resolve().parent.parent
# Fields that only describe a run (logged, never acted on), as their docstrings/descriptions say.
INFORMATIONAL = {"description"}
# Where config models are defined: reading a field there (validators) does not count as using it.
DEFINITIONS = {"rsd_core/config.py", "rsd_core/presets.py"}


def _leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, field name) of every leaf; an operator spec expands to every registered kind's fields."""
    out = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, OperatorSpecBase):
            for kind in registered_kinds():
                out += [(f"{path}[{kind}].{f}", f) for f in get_kind(kind).spec.model_fields]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _leaves(annotation, path + ".")
        else:
            out.append((path, name))
    return out


@functools.cache
def _attributes_read() -> set[str]:
    """Every attribute name loaded anywhere in the code that runs (library, tasks, workflows, CLI)."""
    names = set()
    for folder in ("rsd_core", "tasks", "workflows", "rsd_cli"):
        for path in (ROOT / folder).rglob("*.py"):
            if str(path.relative_to(ROOT)) in DEFINITIONS:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    names.add(node.attr)
    return names


LEAVES = _leaves(PipelineConfig)


def test_an_unread_field_is_caught():
    class WithDeadField(BaseModel):
        zzz_never_read: int = 0

    ((path, name),) = _leaves(WithDeadField)
    assert name not in _attributes_read()


def test_the_walk_sees_every_section():
    sections = {path.split(".")[0] for path, _ in LEAVES}
    assert sections == set(PipelineConfig.model_fields)
    assert ("data.operator[mri].R", "R") in LEAVES and ("distill.alpha", "alpha") in LEAVES


@pytest.mark.parametrize(("path", "name"), LEAVES, ids=[p for p, _ in LEAVES])
def test_every_field_is_used_or_refused(path, name):
    if name in INFORMATIONAL:
        return
    if path.startswith("resources."):
        task, field = path.split(".")[1:]
        base = build_config("cpu-smoke")
        spec = getattr(base.resources, task)
        changed = base.model_copy(update={"resources": base.resources.model_copy(
            update={task: spec.model_copy(update={field: _other(getattr(spec, field))})})})
        with pytest.raises(ValueError, match=path.replace(".", r"\.")):
            check_local_resources(changed, "cpu-smoke")
        return
    assert name in _attributes_read(), f"{path}: no code reads '{name}'"


def _other(value):
    """A different value of the same kind (a count one higher, a quantity string with a 0 appended)."""
    return value + 1 if isinstance(value, int) else f"{value}0"


@pytest.mark.parametrize("name", ["lr", "betas", "grad_clip", "data_workers", "shuffle_buffer"])
def test_a_teacher_loop_setting_in_the_distillations_loop_is_refused_by_name(name):
    """Distillation has two optimisers (set in distill) and reads no dataset: these would be ignored there."""
    value = {"lr": 0.123, "betas": [0.5, 0.9], "grad_clip": 3.0, "data_workers": 2, "shuffle_buffer": 16}[name]
    with pytest.raises(ConfigError, match=rf"distill_train\.{name}"):
        build_config("cpu-smoke", overrides=[f"distill_train.{name}={value}"])

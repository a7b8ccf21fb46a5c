"""st_fast.config: the options in one place (StFastConfig, the patch() in effect, the options of one trainer)."""

from __future__ import annotations

import types

import pytest

import st_fast
from st_fast.config import StFastConfig, patch_config, trainer_config


@pytest.fixture
def unpatched():
    st_fast.unpatch()
    yield
    st_fast.unpatch()


def test_patch_options_are_kept_here_while_patched(unpatched):
    assert patch_config() is None and not st_fast.is_patched()
    st_fast.patch({"backend": "torch"})
    assert patch_config() == StFastConfig(backend="torch") and st_fast.is_patched()
    st_fast.patch({"sampler": False})  # a second patch() updates the options only
    assert patch_config() == StFastConfig(sampler=False)
    st_fast.unpatch()
    assert patch_config() is None and not st_fast.is_patched()


def test_a_trainer_has_its_own_options_else_the_patch_in_effect(unpatched):
    bare = types.SimpleNamespace()
    assert trainer_config(bare) == StFastConfig()
    st_fast.patch({"report": False})
    assert trainer_config(bare) == StFastConfig(report=False)
    owned = types.SimpleNamespace(st_fast_config=StFastConfig(loss=False))
    built_patched = types.SimpleNamespace(_st_fast_config=StFastConfig(backend="torch"))
    assert trainer_config(owned) == StFastConfig(loss=False)
    assert trainer_config(built_patched) == StFastConfig(backend="torch")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, StFastConfig()),
        (True, StFastConfig()),
        (False, StFastConfig(loss=False, sampler=False, report=False)),
        ({"backend": "native"}, StFastConfig(backend="native")),
    ],
)
def test_coerce(value, expected):
    assert StFastConfig.coerce(value) == expected
    assert st_fast.StFastConfig is StFastConfig

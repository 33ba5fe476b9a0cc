from __future__ import annotations

import pytest

from lightning_bnsgd import _compat
from lightning_bnsgd._compat import ENV_VAR, select_backend

BOTH = {"pytorch_lightning": True, "lightning": True}


@pytest.mark.parametrize("value", ["lightning", "pytorch_lightning"])
def test_env_var_wins(value):
    assert select_backend(env={ENV_VAR: value}, imported={"pytorch_lightning": 1}, installed=BOTH) == value


def test_bad_env_var_names_the_variable_and_allowed_values():
    with pytest.raises(ValueError, match=f"{ENV_VAR}.*'pytorch_lightning' or 'lightning'"):
        select_backend(env={ENV_VAR: "lightnin"}, imported={}, installed=BOTH)


def test_already_imported_namespace_wins():
    assert select_backend(env={}, imported={"lightning.pytorch": 1}, installed=BOTH) == "lightning"
    assert select_backend(env={}, imported={"pytorch_lightning": 1}, installed=BOTH) == "pytorch_lightning"
    both = {"pytorch_lightning": 1, "lightning.pytorch": 1}
    assert select_backend(env={}, imported=both, installed=BOTH) == "pytorch_lightning"


def test_default_and_fallback():
    assert select_backend(env={}, imported={}, installed=BOTH) == "pytorch_lightning"
    only_l = {"pytorch_lightning": False, "lightning": True}
    assert select_backend(env={}, imported={}, installed=only_l) == "lightning"


def test_selected_classes_come_from_one_namespace():
    root = _compat.pl.__name__
    for cls in (_compat.Trainer, _compat.LightningModule, _compat.LightningDataModule, _compat.Callback):
        assert cls.__module__.startswith(root), (cls, root)

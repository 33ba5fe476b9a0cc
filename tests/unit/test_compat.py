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
    assert select_backend(env={}, imported=both, installed=BOTH) == "lightning"


def test_unified_package_installed_means_lightning_pytorch():
    assert select_backend(env={}, imported={}, installed=BOTH) == "lightning"
    only_l = {"pytorch_lightning": False, "lightning": True}
    assert select_backend(env={}, imported={}, installed=only_l) == "lightning"
    only_pl = {"pytorch_lightning": True, "lightning": False}
    assert select_backend(env={}, imported={}, installed=only_pl) == "pytorch_lightning"


def test_selected_classes_come_from_one_namespace():
    root = _compat.pl.__name__
    for cls in (_compat.Trainer, _compat.LightningModule, _compat.LightningDataModule, _compat.LightningCLI):
        assert cls.__module__.startswith(root), (cls, root)


def test_callback_base_is_a_callback_of_every_installed_namespace():
    for namespace in _compat.NAMESPACES:
        assert issubclass(_compat.Callback, namespace.Callback), namespace.__name__
    assert _compat.NAMESPACES[0] is _compat.pl


def test_namespace_of_follows_the_object_not_the_import_order():
    for namespace in _compat.NAMESPACES:
        trainer = namespace.Trainer(logger=False, enable_progress_bar=False)
        assert _compat.namespace_of(trainer) is namespace

        class UserModule(namespace.LightningModule):
            pass

        assert _compat.namespace_name(UserModule) == namespace.__name__
    with pytest.raises(TypeError, match=r"not a class of pytorch_lightning or lightning\.pytorch"):
        _compat.namespace_of(object())

"""`rollout.plugins.load_plugins`: imports the modules a config names, once; a module that cannot be
imported is a ValueError naming it and the config key."""

import sys

import pytest

from rollout.plugins import load_plugins


def test_loads_each_module_once():
    load_plugins([])
    load_plugins(["json", "rollout.templates"])
    module = sys.modules["rollout.templates"]
    load_plugins(["rollout.templates"])  # idempotent: the cached module, not a second import
    assert sys.modules["rollout.templates"] is module


@pytest.mark.parametrize("name", ["no_such_plugin_module", "rollout.no_such_module", ""])
def test_unimportable_module_names_itself_and_the_config_key(name):
    with pytest.raises(ValueError, match=rf"plugin {name!r} \(config key plugins\) could not be imported"):
        load_plugins([name])


def test_an_error_inside_the_import_is_chained(monkeypatch):
    monkeypatch.setitem(sys.modules, "halted_plugin", None)  # Python's own "import halted" failure
    with pytest.raises(ValueError, match=r"plugin 'halted_plugin' .*: ModuleNotFoundError: import of halted_plugin halted") as err:
        load_plugins(["halted_plugin"])
    assert isinstance(err.value.__cause__, ImportError)


def test_a_single_string_is_refused():
    with pytest.raises(ValueError, match=r"expected a list of module names, e.g. \[my_task\]"):
        load_plugins("my_task")

"""The config's `plugins` and the registered names it validates: judge kinds and `tiny:<name>`
models are checked against the registries (after the plugins are loaded), with messages that name
the value, the known names and the key to change."""

import pytest

from actors.named_models import known_named_models
from cluster.config import ConfigError, R3Config, load_config
from reward.registry import known_judges


def test_no_plugins_by_default():
    assert R3Config().plugins == [] and load_config().plugins == []


def test_unknown_judge_kind_names_the_value_and_the_known_kinds():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["judge.kind=nope"])
    msg = str(err.value)
    assert "judge.kind: got 'nope'" in msg and str(known_judges()) in msg and "config key plugins" in msg
    assert load_config(None, ["judge.kind=constant"]).judge.kind == "constant"  # any registered kind


def test_remote_judge_still_needs_its_endpoint():
    with pytest.raises(ConfigError, match="judge.url and judge.remote_model"):
        load_config(None, ["judge.kind=remote"])


def test_a_plugin_that_cannot_be_imported_is_a_config_error():
    with pytest.raises(ConfigError, match=r"plugin 'no_such_plugin' \(config key plugins\) could not be imported"):
        load_config(None, ["plugins=[no_such_plugin]"])
    with pytest.raises(ConfigError, match=r"plugins: got 'json': Input should be a valid list"):
        load_config(None, ["plugins=json"])  # not a list: validation says so, nothing is imported
    assert load_config(None, ["plugins=[json]"]).plugins == ["json"]


def test_tiny_paths_are_checked_against_the_named_models():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["models.reasoner.path=tiny:gpt5"], check_paths=True)
    msg = str(err.value)
    assert "models.reasoner.path: 'tiny:gpt5' is not a named model" in msg
    assert str(["tiny:" + n for n in known_named_models()]) in msg and "config key plugins" in msg

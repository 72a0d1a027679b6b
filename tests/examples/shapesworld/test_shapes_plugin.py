"""ShapesWorld plugs in through the product's registries: `plugins: [examples.shapesworld]` registers
the judge kind, the prompt sources and the named models; without it the config's names are
unknown; a judge spec carries the plugin list to the process that builds the judge (a fresh
process, a Serve replica)."""

import subprocess
import sys

import numpy as np
import pytest

import actors.named_models as named_models
import examples
import reward.registry as judges
import rollout.datasets as datasets
from cluster.config import ConfigError, load_config
from examples.shapesworld.models import WARM_START
from examples.shapesworld.run import DEFAULT_CONFIG

PLUGIN = "examples.shapesworld"
REGISTERED = {
    (judges, "_REGISTRY"): {"shapes", "shapes-colour-share", "shapes-colour-area"},
    (datasets, "_SOURCES"): {"shapes-train", "shapes-test"},
    (named_models, "_REGISTRY"): {"shapes-flux", "shapes-vlm"},
}


@pytest.fixture
def fresh(monkeypatch):
    """This process as if the plugin had never been loaded: its names out of the three registries
    and its module out of the module cache (all restored after the test)."""
    for (module, attr), names in REGISTERED.items():
        monkeypatch.setattr(module, attr, {k: v for k, v in getattr(module, attr).items() if k not in names})
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    monkeypatch.delattr(examples, "shapesworld", raising=False)


def test_config_names_are_unknown_without_the_plugin(fresh):
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_CONFIG, ["plugins=[]"])
    assert "judge.kind: got 'shapes': unknown judge kind" in str(err.value)
    assert "shapes" not in judges.known_judges() and "shapes-train" not in datasets.known_prompt_sources()


def test_the_plugin_registers_judge_prompts_and_models(fresh):
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.plugins == [PLUGIN] and cfg.judge.kind == "shapes"
    assert {"shapes", "shapes-colour-share", "shapes-colour-area"} <= set(judges.known_judges())
    area = judges.build_judge({"kind": "shapes-colour-area", "plugins": [PLUGIN]})
    assert (area.over, area.correct_at) == ("image", 0.5)
    assert {"shapes-train", "shapes-test"} <= set(datasets.known_prompt_sources())
    assert {"shapes-flux", "shapes-vlm"} <= set(named_models.known_named_models())
    train, test = datasets.load_prompt_source("shapes-train"), datasets.load_prompt_source("shapes-test")
    assert train and test and not {r.prompt for r in train} & {r.prompt for r in test}
    load_config(DEFAULT_CONFIG)  # loading it again registers nothing twice


def test_named_models_are_the_shipped_warm_start(fresh):
    load_config(DEFAULT_CONFIG)
    from cluster.session import resolve_model_path

    if (WARM_START / "manifest.json").is_file():
        assert resolve_model_path("tiny:shapes-flux") == str(WARM_START / "flux")
        assert resolve_model_path("tiny:shapes-vlm") == str(WARM_START / "vlm")
    else:
        with pytest.raises(ValueError, match="python -m examples.shapesworld.pretrain"):
            resolve_model_path("tiny:shapes-flux")


def test_judge_spec_carries_the_plugins(fresh):
    with pytest.raises(ValueError, match="unknown judge kind 'shapes'"):
        judges.build_judge({"kind": "shapes"})
    judge = judges.build_judge({"kind": "shapes", "plugins": [PLUGIN]})
    assert type(judge).__module__ == "examples.shapesworld.judge" and type(judge).__name__ == "ShapesJudge"


def test_build_judge_with_plugins_in_a_fresh_process():
    """What a Serve replica sees: nothing imported but the registry; the spec's plugins register
    the kind before it is looked up."""
    code = (
        "import sys\n"
        "from reward.registry import build_judge, known_judges\n"
        "assert 'shapes' not in known_judges() and 'examples.shapesworld' not in sys.modules\n"
        "judge = build_judge({'kind': 'shapes', 'plugins': ['examples.shapesworld']})\n"
        "print(type(judge).__name__, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["ShapesJudge", "False"]  # and the plugin pulled in no torch


def test_judge_client_spec_names_the_plugins(monkeypatch):
    import cluster.roles as roles
    import reward.service as service
    from cluster.roles import ModelPaths, build_judge_client

    deployed, options = {}, {}
    monkeypatch.setattr(service, "start_serve", lambda **kw: 0)
    monkeypatch.setattr(service, "deploy_judge", lambda spec, **kw: (deployed.update(spec), options.update(kw)))
    monkeypatch.setattr(roles, "judge_app_name", lambda: "judge-07000000")  # the Ray job's id, unique per driver
    cfg = load_config(DEFAULT_CONFIG)
    judge = build_judge_client(cfg, ModelPaths("r", "g", None))
    assert deployed == {"kind": "shapes", "plugins": [PLUGIN]}
    # its own Serve application, which its shutdown removes; no HTTP route without judge.http_port
    assert options["name"] == judge.client.app_name == "judge-07000000" and options["route_prefix"] is None


@pytest.mark.integration
def test_serve_replica_and_ray_worker_load_the_plugin(ray_cluster):
    """A Serve replica builds the plugin's judge from the spec alone; a plain Ray worker can import
    the example (editable install, or the project root on PYTHONPATH)."""
    import ray
    from ray import serve

    from examples.shapesworld.render import render_correct
    from examples.shapesworld.tasks import metadata_for_prompt
    from reward.service import ServeJudgeClient, deploy_judge, start_serve
    from rollout.interfaces import JudgeItem

    @ray.remote(num_cpus=0.1)
    def plugin_judges() -> list[str]:
        from rollout.plugins import load_plugins

        load_plugins([PLUGIN])
        return judges.known_judges()

    assert "shapes" in ray.get(plugin_judges.remote(), timeout=120)
    start_serve()
    try:
        deploy_judge({"kind": "shapes", "plugins": [PLUGIN]}, name="shapes-plugin", num_cpus=0.25)
        meta = metadata_for_prompt("a photo of a red circle")
        image = render_correct(meta, np.random.default_rng(0)).image
        (result,) = ServeJudgeClient("shapes-plugin", timeout_s=60).score([JudgeItem(image, meta["prompt"], meta)])
        assert result.error is None and result.correct
    finally:
        serve.shutdown()

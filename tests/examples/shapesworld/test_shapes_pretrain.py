"""ShapesWorld warm start: answer formats, data pool, warm-start paths (pure), and a shortened run
of the real entry points (integration, slow: builds a scaled warm start into a temp folder, trains
every model a few steps, evaluates them, then runs RL from it)."""

import hashlib
import json

import numpy as np
import pytest

from examples.shapesworld.generator_sft import foreground_weight
from examples.shapesworld.models import WARM_START, warm_start_path
from examples.shapesworld.pretrain import pretrain
from examples.shapesworld.reasoner import ReasonerRecipe, plan_answer, reflect_answer
from examples.shapesworld.recipe import PretrainSettings, make_pool, sample_sigmas, warmup_cosine
from examples.shapesworld.tasks import TAGS, build_splits, metadata_for_prompt
from rollout.parsing import is_stop, parse_answer


def test_answers_are_well_formed_and_stop_only_when_correct():
    meta = metadata_for_prompt("a photo of two circles left of a square")
    plan = parse_answer(plan_answer(meta))
    assert plan.well_formed and plan.answer == meta["prompt"]
    assert plan.think == "as asked."  # short constant think: the answer budget (shapes_reasoner)
    stop = parse_answer(reflect_answer("red circle.", None))
    fix = parse_answer(reflect_answer("blue circle.", "change the blue circle to red"))
    assert stop.well_formed and is_stop(stop.answer)
    assert fix.well_formed and not is_stop(fix.answer) and fix.answer == "change the blue circle to red"


def test_pool_pairs_wrong_images_with_their_fix():
    pool = make_pool(build_splits().train, 12, seed=0)
    assert pool.correct.shape == pool.wrong.shape == pool.fixed.shape == (12, 64, 64, 3)
    assert len(pool.instructions) == len(pool.prompts) == 12
    assert all(not np.array_equal(w, f) for w, f in zip(pool.wrong, pool.fixed, strict=True))
    again = make_pool(build_splits().train, 12, seed=0)
    assert np.array_equal(again.wrong, pool.wrong) and again.instructions == pool.instructions


def test_settings_scale_and_schedule():
    s = PretrainSettings(scale=0.01, flow_steps=600, vae_steps=800, pool=40)
    assert s.steps("flow_steps") == 6 and s.steps("vae_steps") == 8 and s.steps("pool") == 1
    f = warmup_cosine(100)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0) and f(99) < 0.01


def test_pool_layout_and_sigma_sampling_are_settings():
    canon = make_pool(build_splits().train, 6, seed=0, layout="canonical")
    rand = make_pool(build_splits().train, 6, seed=0)
    assert canon.prompts == rand.prompts and not np.array_equal(canon.correct, rand.correct)
    assert {s.background for s in canon.correct_scenes} == {(225, 225, 225)}  # one image per prompt
    assert PretrainSettings().layout == "canonical" and PretrainSettings().flow_sigma == "uniform"
    with pytest.raises(ValueError, match="layout='grid'"):
        PretrainSettings(layout="grid")
    with pytest.raises(ValueError, match="flow_sigma='normal'"):
        PretrainSettings(flow_sigma="normal")
    import torch

    uni = sample_sigmas("uniform", 20_000, torch.Generator().manual_seed(0))
    logit = sample_sigmas("logit_normal", 20_000, torch.Generator().manual_seed(0))
    assert 0 <= float(uni.min()) and float(uni.max()) < 1 and float((uni > 0.9).float().mean()) == pytest.approx(0.1, abs=0.01)
    assert float((logit > 0.9).float().mean()) == pytest.approx(0.014, abs=0.005)  # P(N(0,1) > logit(0.9) = 2.197)


def test_vae_weight_covers_objects_and_a_margin_around_them():
    import torch

    x = torch.full((1, 3, 8, 8), 0.8)  # grey background (border median)
    x[0, :, 3, 4] = torch.tensor([1.0, -1.0, -1.0])  # one red pixel
    plain = foreground_weight(x, 10.0, margin=0)[0, 0]
    assert plain.shape == (8, 8) and plain[3, 4] == 11 and float(plain.sum()) == 64 + 10
    wide = foreground_weight(x, 10.0, margin=1)[0, 0]
    assert torch.equal(wide[2:5, 3:6], torch.full((3, 3), 11.0))  # the pixel and its 8 neighbours
    assert float(wide.sum()) == 64 + 9 * 10
    assert PretrainSettings().vae_foreground_margin == 2
    with pytest.raises(ValueError, match="vae_foreground_margin=-1"):
        PretrainSettings(vae_foreground_margin=-1)
    with pytest.raises(ValueError, match="flow_continue_steps=-1"):
        PretrainSettings(flow_continue_steps=-1)


def test_warm_start_path_says_how_to_build(tmp_path):
    with pytest.raises(ValueError, match="known"):
        warm_start_path("lm", tmp_path)
    with pytest.raises(ValueError, match=f"python -m examples.shapesworld.pretrain --out {tmp_path}"):
        warm_start_path("flux", tmp_path)
    (tmp_path / "flux").mkdir()
    with pytest.raises(ValueError, match="manifest.json"):  # models without a manifest are unfinished
        warm_start_path("flux", tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    assert warm_start_path("flux", tmp_path) == tmp_path / "flux"
    assert WARM_START.parent.name == "shapesworld" and WARM_START.name == "warmstart"  # the shipped one


def test_finished_warm_start_is_kept_without_force(tmp_path):
    (tmp_path / "manifest.json").write_text('{"kept": true}')
    assert pretrain(PretrainSettings(), tmp_path) == tmp_path  # returns at once: nothing trained
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"kept": True}


@pytest.mark.integration
def test_failed_parallel_reasoner_stage_is_reported(tmp_path):
    """The child process's failure surfaces in the parent as an error naming the stage, not a
    missing file later."""
    import torch

    from examples.shapesworld.pretrain import _ReasonerStage

    if torch.get_num_threads() < 2:
        pytest.skip("the reasoner stage runs in a child process only with >= 2 threads")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the child cannot create its model folder under a file
    s = PretrainSettings(scale=0.01, pool=4)
    pool = make_pool(build_splits(seed=0).train, 4, seed=0)
    stage = _ReasonerStage(blocker / "vlm", pool, [], s)
    try:
        with pytest.raises(RuntimeError, match="reasoner stage .* failed with exit code 1"):
            stage.handoff(s.steps("flow_steps_beside_reasoner"))
    finally:
        stage.stop()
        torch.set_num_threads(stage._threads)
    # (no check of this process's thread count: once a vLLM CPU engine has run in the same
    # process, as in the full suite, torch.set_num_threads is a no-op)


@pytest.mark.integration
def test_reasoner_stage_without_parallelism_runs_in_this_process(tmp_path):
    import torch

    from examples.shapesworld.pretrain import _ReasonerStage

    threads = torch.get_num_threads()
    s = PretrainSettings(scale=0.01, pool=8, eval_prompts=3, parallel_reasoner=False)
    splits = build_splits(seed=0)
    stage = _ReasonerStage(tmp_path / "vlm", make_pool(splits.train, 8, seed=0), splits.test, s)
    stage.handoff(s.steps("flow_steps_beside_reasoner"))  # nothing to hand off
    result = stage.result()
    assert torch.get_num_threads() == threads and result["threads"] == threads
    assert len(result["losses"]) == 11 and result["eval"]["n"] == 2  # 1100 steps and 3 // 3 prompts (>= 2) at 1 %
    assert (tmp_path / "vlm" / "config.json").is_file() and not (tmp_path / "reasoner.json").exists()


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory):
    """A 1 %-scale warm start (every stage runs a few steps) in a folder of its own."""
    from examples.shapesworld.pretrain import main

    out = tmp_path_factory.mktemp("shapes-warmstart")
    assert main(["--scale", "0.01", "--eval-prompts", "9", "--out", str(out), "--force"]) == 0
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_shortened_warm_start_saves_loadable_models(warm_start):
    from diffusers import FluxKontextPipeline
    from transformers import Idefics3ForConditionalGeneration

    root = warm_start
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["command"] == (
        f"python -m examples.shapesworld.pretrain --scale 0.01 --eval-prompts 9 --out {root} --force"
    )
    assert manifest["seed"] == 0 and manifest["settings"]["scale"] == 0.01
    on_disk = sorted(f.relative_to(root).as_posix() for d in ("flux", "vlm") for f in (root / d).rglob("*") if f.is_file())
    assert sorted(manifest["files"]) == on_disk and "flux/transformer/config.json" in on_disk
    assert all(hashlib.sha256((root / f).read_bytes()).hexdigest() == h for f, h in manifest["files"].items())
    short = PretrainSettings(scale=0.01)
    assert manifest["losses"]["flow"]["steps"] == short.steps("flow_steps") + short.steps("flow_continue_steps")
    assert 0.0 <= manifest["generator_eval"]["t2i_accuracy"] <= 1.0
    assert 0.0 <= manifest["reasoner_eval"]["reflect_stop_accuracy"] <= 1.0
    threads = manifest["threads"]  # every thread again after the handoff
    assert manifest["reasoner_threads"] == (threads // 2 if threads >= 2 else threads)
    assert {"reasoner_s", "reasoner_eval_s", "reasoner_wait_s", "flow_s", "total_s"} <= set(manifest["times"])
    own, r = manifest["reasoner_own_images"], ReasonerRecipe()  # the second reasoner stage
    assert own["train_images"] + own["train_left_out"] == r.scaled(r.own_images, 0.01) == 30
    assert own["eval_images"] + own["eval_left_out"] == 27  # 3 x --eval-prompts
    if "skipped" in own:  # a 1 % generator may draw nothing the judge can name
        assert own["train_images"] == 0 and manifest["losses"]["reasoner_own_images"]["steps"] == 0
    else:
        assert manifest["losses"]["reasoner_own_images"]["steps"] == r.scaled(r.own_steps, 0.01) == 20
        assert own["before"]["n_correct"] + own["before"]["n_wrong"] == own["eval_images"]
        assert {"reasoner_own_draw_s", "reasoner_own_s", "reasoner_own_eval_s"} <= set(manifest["times"])
    assert "reflect_stop_accuracy" in manifest["reasoner_eval_rendered_stage"]
    assert not (root / "reasoner.json").exists()  # the child's result file is read and removed
    assert [p.name for p in root.parent.iterdir() if ".tmp-" in p.name] == []  # the build folder is gone
    pipe = FluxKontextPipeline.from_pretrained(str(warm_start_path("flux", root)))
    assert pipe.transformer.config.num_layers == 2 and pipe.vae.config.scaling_factor != 1.0
    assert pipe.vae_scale_factor == 4
    assert pipe.tokenizer_2.tokenize(" triangles") == ["Ġtriangles"]  # the saved whole-word BPE
    Idefics3ForConditionalGeneration.from_pretrained(warm_start_path("vlm", root))


@pytest.mark.integration
@pytest.mark.slow
def test_shortened_shapes_run_writes_results(warm_start, tmp_path, capsys):
    """The run's entry point, shortened, from the scaled warm start (the config's models overridden):
    evaluation → 2 RL steps → evaluation → results files."""
    from examples.shapesworld.run import main

    overrides = [
        f"models.generator.path={warm_start / 'flux'}", f"models.reasoner.path={warm_start / 'vlm'}",
        f"train.run_dir={tmp_path / 'runs'}", "train.run_name=short", "train.steps=2", "train.eval_rounds=2",
        "data.eval_limit=2", "data.eval_per_category=2", "r3.group_size=2", "r3.prompts_per_step=2", "flow_grpo.num_steps=4",
        "flow_grpo.eval_num_steps=4", "flow_grpo.edit_num_steps=4", "checkpoint.every=2", "grpo.max_tokens=24",
    ]
    capsys.readouterr()
    assert main(overrides) == 0  # the default config: examples/shapesworld/configs/shapes_cpu.yaml
    run = tmp_path / "runs" / "short"
    summary = capsys.readouterr().out  # the console ends with the summary; engine logs went to the log file
    assert "accuracy per round" in summary and "  before RL" in summary and "  after RL" in summary
    assert f"gallery: {run / 'eval-final' / 'gallery.html'}" in summary
    assert "INFO" not in summary and (run / "engine.log").stat().st_size > 0
    results = json.loads((run / "results.json").read_text())
    for when in ("before", "after"):
        assert len(results[when]["accuracy_per_round"]) == 2
        assert set(results[when]["accuracy_per_tag"]) <= set(TAGS)
        assert results[when]["reflection"]["decisions"] >= 0
    assert [r["step"] for r in results["reward_curve"]] == [0, 1]
    assert all(0.0 <= r["generate/score_mean"] <= 1.0 for r in results["reward_curve"])
    manifest = json.loads((warm_start / "manifest.json").read_text())
    assert results["warm_start"]["path"] == str(warm_start)
    assert results["warm_start"]["command"] == manifest["command"] and results["warm_start"]["seed"] == 0
    md = (run / "results.md").read_text()
    assert "| **overall** |" in md
    assert "4 samples of 2 distinct prompts" in md  # 2 tags × 2 samples, each prompt drawn twice
    assert (run / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "eval-before" / "eval.json").is_file() and (run / "eval-final" / "eval.json").is_file()

    # The paired probe compares the run's generator with the warm start's on the same prompts and noise.
    from examples.shapesworld.probe import main as probe_main

    capsys.readouterr()
    assert probe_main(["--prompts", "3", "--warm-start", str(warm_start), str(run / "checkpoints" / "step-000002")]) == 0
    assert "| short/step-000002 |" in capsys.readouterr().out
    probe = json.loads((run / "probe.json").read_text())["results"]
    assert list(probe) == ["warm start", "short/step-000002"]
    assert all(list(probe[v]) == ["train", "test", "edit", "oracle"] and probe[v]["edit"]["n"] == 3 for v in probe)
    assert all(len(probe[v]["oracle"]["accuracy_by_round"]) == 4 for v in probe)  # rounds 0-3
    assert probe_main(["--warm-start", str(warm_start), str(run / "checkpoints")]) == 2  # not a checkpoint: refused
    assert probe_main(["--warm-start", str(tmp_path)]) == 2  # no warm start there: refused


@pytest.mark.integration
@pytest.mark.slow
def test_probe_pairs_prompts_and_noise(warm_start):
    """The warm start's own transformer loaded as a "checkpoint" reproduces the warm start's
    results exactly (same prompts, per-prompt noise, deterministic ODE sampling), so differences
    between variants come from their weights alone."""
    from examples.shapesworld.probe import probe_generator, probe_prompts

    base = warm_start_path("flux", warm_start)
    results = probe_generator(base, {"a": None, "b": base / "transformer"}, probe_prompts(4), num_steps=2)
    assert results["a"] == results["b"]


def test_shapes_tokenizers_give_one_token_per_word():
    """The ShapesWorld generator's BPE reads every prompt and instruction word as one token (the
    project's 384-token BPE cut "triangles" into 5 pieces), and each fits models.generator's
    max_sequence_length with its eos."""
    from actors.tiny_flux import flux_tokenizer
    from examples.shapesworld.models import SHAPES_VOCAB_SIZE, shapes_corpus
    from examples.shapesworld.render import render_wrong
    from examples.shapesworld.tasks import all_tasks

    tok = flux_tokenizer(64, vocab_size=SHAPES_VOCAB_SIZE, corpus=shapes_corpus())
    tasks = all_tasks()
    rng = np.random.default_rng(0)
    texts = [t["prompt"] for t in tasks[::50]]
    texts += [render_wrong(tasks[i], rng).instruction for i in rng.choice(len(tasks), 100, replace=False)]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text.split()) + 1 <= PretrainSettings().max_sequence_length, text
    assert len(tok("a photo of four pink triangles")["input_ids"]) == 7


def test_adaln_zero_starts_every_block_as_identity_and_still_learns():
    import torch
    from diffusers import FluxTransformer2DModel

    from examples.shapesworld.models import adaln_zero_
    from rollout.flux_forward import flux_velocity

    torch.manual_seed(0)
    t = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               guidance_embeds=True, axes_dims_rope=[4, 6, 6])  # fmt: skip
    args = (torch.randn(2, 4, 64), torch.tensor([0.3, 0.8]), torch.randn(2, 5, 32), torch.randn(2, 32), torch.ones(2))
    assert flux_velocity(t, *args, 32, 32, None, vae_scale_factor=8).abs().sum() > 0
    adaln_zero_(t)
    v = flux_velocity(t, *args, 32, 32, None, vae_scale_factor=8)
    assert torch.equal(v, torch.zeros_like(v))
    (v - 1.0).pow(2).mean().backward()
    assert t.proj_out.weight.grad.abs().sum() > 0  # the output layer learns first, then the gates



@pytest.mark.integration
@pytest.mark.slow
def test_more_flow_trains_the_generator_further_and_keeps_the_reasoner(warm_start, tmp_path):
    """`more_flow` from the scaled warm start: a new generator (the transformer's weights change),
    the base's reasoner byte for byte, a manifest naming the base and every file's sha256; it
    refuses a folder that already holds a warm start and a base that is not one."""
    import torch
    from safetensors.torch import load_file

    from examples.shapesworld.more_flow import main

    out = tmp_path / "further"
    args = ["--base", str(warm_start), "--out", str(out), "--steps", "3", "--eval-prompts", "3"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "python -m examples.shapesworld.more_flow " + " ".join(args)
    assert manifest["base"] == str(warm_start)
    assert manifest["base_manifest_sha256"] == hashlib.sha256((warm_start / "manifest.json").read_bytes()).hexdigest()
    assert manifest["stage"]["steps"] == manifest["losses"]["flow"]["steps"] == 3
    assert manifest["stage"]["seed"] == 2  # after the pretrain's two flow stages (seeds 0 and 1)
    assert manifest["stage"]["layout"] == manifest["settings"]["layout"] == "canonical"  # the base's
    assert manifest["settings"]["scale"] == 0.01 and manifest["generator_eval"]["n"] == 3
    on_disk = sorted(f.relative_to(out).as_posix() for d in ("flux", "vlm") for f in (out / d).rglob("*") if f.is_file())
    assert sorted(manifest["files"]) == on_disk
    assert all(hashlib.sha256((out / f).read_bytes()).hexdigest() == h for f, h in manifest["files"].items())
    for f in (warm_start / "vlm").rglob("*"):
        if f.is_file():
            assert (out / "vlm" / f.relative_to(warm_start / "vlm")).read_bytes() == f.read_bytes()
    weights = "flux/transformer/diffusion_pytorch_model.safetensors"
    before, after = load_file(str(warm_start / weights)), load_file(str(out / weights))
    assert before.keys() == after.keys() and all(v.dtype == after[k].dtype for k, v in before.items())
    assert any(not torch.equal(v, after[k]) for k, v in before.items())
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert main(args) == 2  # out holds a warm start now
    chained = ["--base", str(out), "--out", str(tmp_path / "chained"), "--steps", "2", "--eval-prompts", "3",
               "--layout", "random"]  # fmt: skip
    assert main(chained) == 0
    stage = json.loads((tmp_path / "chained" / "manifest.json").read_text())["stage"]
    assert stage["seed"] == 3 and stage["layout"] == "random"  # other batches, of many images per prompt
    assert main(["--base", str(tmp_path), "--out", str(tmp_path / "other")]) == 2  # no manifest there


def test_more_flow_refuses_bad_numbers_naming_them(capsys):
    from examples.shapesworld.more_flow import main

    assert main(["--out", "unused", "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["--out", "unused", "--layout", "diagonal"])
    assert refused.value.code == 2 and "'diagonal'" in capsys.readouterr().err

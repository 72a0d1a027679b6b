"""ShapesWorld warm start: answer formats, data pool, cache paths (pure), and a shortened run of
the real entry point (integration, slow: trains every model a few steps and evaluates them)."""

import json

import numpy as np
import pytest

from cluster.shapes_models import SHAPES_VERSION, shapes_model_path
from cluster.shapes_pretrain import PretrainSettings, foreground_weight, make_pool, sample_sigmas
from cluster.shapes_reasoner import plan_answer, reflect_answer, warmup_cosine
from rollout.parsing import is_stop, parse_answer
from rollout.shapesworld.tasks import TAGS, build_splits, metadata_for_prompt


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


def test_own_image_reflect_command_refuses_bad_values(tmp_path, capsys):
    from cluster.shapes_selfreflect import main

    assert main(["--out", str(tmp_path), "--steps", "0", "--cache", str(tmp_path)]) == 2
    assert "--steps=0" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--cache", str(tmp_path)]) == 2  # no warm start there
    assert "python -m cluster.shapes_pretrain" in capsys.readouterr().err


def test_model_path_says_how_to_build(tmp_path):
    with pytest.raises(ValueError, match="known"):
        shapes_model_path("shapes-lm", tmp_path)
    with pytest.raises(ValueError, match="python -m cluster.shapes_pretrain"):
        shapes_model_path("shapes-flux", tmp_path)
    root = tmp_path / SHAPES_VERSION
    (root / "flux").mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    assert shapes_model_path("shapes-flux", tmp_path) == root / "flux"


@pytest.mark.integration
def test_failed_parallel_reasoner_stage_is_reported(tmp_path):
    """The child process's failure surfaces in the parent as an error naming the stage, not a
    missing file later."""
    import torch

    from cluster.shapes_pretrain import _ReasonerStage

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

    from cluster.shapes_pretrain import _ReasonerStage

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
def warm_cache(tmp_path_factory):
    """A 1 %-scale warm start (every stage runs a few steps) in a cache of its own."""
    from cluster.shapes_pretrain import main

    cache = tmp_path_factory.mktemp("shapes-cache")
    assert main(["--scale", "0.01", "--eval-prompts", "9", "--cache", str(cache)]) == 0
    return cache


@pytest.mark.integration
@pytest.mark.slow
def test_shortened_warm_start_saves_loadable_models(warm_cache):
    from diffusers import FluxKontextPipeline
    from transformers import Idefics3ForConditionalGeneration

    root = warm_cache / SHAPES_VERSION
    manifest = json.loads((root / "manifest.json").read_text())
    short = PretrainSettings(scale=0.01)
    assert manifest["losses"]["flow"]["steps"] == short.steps("flow_steps") + short.steps("flow_continue_steps")
    assert 0.0 <= manifest["generator_eval"]["t2i_accuracy"] <= 1.0
    assert 0.0 <= manifest["reasoner_eval"]["reflect_stop_accuracy"] <= 1.0
    threads = manifest["threads"]  # every thread again after the handoff
    assert manifest["reasoner_threads"] == (threads // 2 if threads >= 2 else threads)
    assert {"reasoner_s", "reasoner_eval_s", "reasoner_wait_s", "flow_s", "total_s"} <= set(manifest["times"])
    assert not (root / "reasoner.json").exists()  # the child's result file is read and removed
    pipe = FluxKontextPipeline.from_pretrained(str(shapes_model_path("shapes-flux", warm_cache)))
    assert pipe.transformer.config.num_layers == 2 and pipe.vae.config.scaling_factor != 1.0
    assert pipe.vae_scale_factor == 4
    assert pipe.tokenizer_2.tokenize(" triangles") == ["Ġtriangles"]  # the saved whole-word BPE
    Idefics3ForConditionalGeneration.from_pretrained(shapes_model_path("shapes-vlm", warm_cache))


@pytest.mark.integration
@pytest.mark.slow
def test_shortened_shapes_run_writes_results(warm_cache, tmp_path, monkeypatch, capsys):
    """`make shapes`'s entry, shortened: evaluation → 2 RL steps → evaluation → results files."""
    from cluster.shapes_run import main

    monkeypatch.setenv("R3RL_CACHE", str(warm_cache))
    overrides = [
        f"train.run_dir={tmp_path / 'runs'}", "train.run_name=short", "train.steps=2", "train.eval_rounds=2",
        "data.eval_limit=2", "data.eval_per_category=2", "r3.group_size=2", "r3.prompts_per_step=2", "flow_grpo.num_steps=4",
        "flow_grpo.eval_num_steps=4", "flow_grpo.edit_num_steps=4", "checkpoint.every=2", "grpo.max_tokens=24",
    ]
    assert main(["--config", "configs/shapes_cpu.yaml", "--cache", str(warm_cache), *overrides]) == 0
    run = tmp_path / "runs" / "short"
    results = json.loads((run / "results.json").read_text())
    for when in ("before", "after"):
        assert len(results[when]["accuracy_per_round"]) == 2
        assert set(results[when]["accuracy_per_tag"]) <= set(TAGS)
        assert results[when]["reflection"]["decisions"] >= 0
    assert [r["step"] for r in results["reward_curve"]] == [0, 1]
    assert all(0.0 <= r["generate/score_mean"] <= 1.0 for r in results["reward_curve"])
    assert results["warm_start"]["version"] == SHAPES_VERSION
    md = (run / "results.md").read_text()
    assert "| **overall** |" in md
    assert "4 samples of 2 distinct prompts" in md  # 2 tags × 2 samples, each prompt drawn twice
    assert (run / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "eval-before" / "eval.json").is_file() and (run / "eval-final" / "eval.json").is_file()

    # The paired probe compares the run's generator with the warm start's on the same prompts and noise.
    from cluster.shapes_probe import main as probe_main

    capsys.readouterr()
    assert probe_main(["--prompts", "3", "--cache", str(warm_cache), str(run / "checkpoints" / "step-000002")]) == 0
    assert "| short/step-000002 |" in capsys.readouterr().out
    probe = json.loads((run / "probe.json").read_text())["results"]
    assert list(probe) == ["warm start", "short/step-000002"]
    assert all(list(probe[v]) == ["train", "test", "edit", "oracle"] and probe[v]["edit"]["n"] == 3 for v in probe)
    assert all(len(probe[v]["oracle"]["accuracy_by_round"]) == 4 for v in probe)  # rounds 0-3
    assert probe_main(["--cache", str(warm_cache), str(run / "checkpoints")]) == 2  # not a checkpoint: refused


@pytest.mark.integration
@pytest.mark.slow
def test_probe_pairs_prompts_and_noise(warm_cache):
    """The warm start's own transformer loaded as a "checkpoint" reproduces the warm start's
    results exactly (same prompts, per-prompt noise, deterministic ODE sampling), so differences
    between variants come from their weights alone."""
    from cluster.shapes_probe import probe_generator, probe_prompts

    base = shapes_model_path("shapes-flux", warm_cache)
    results = probe_generator(base, {"a": None, "b": base / "transformer"}, probe_prompts(4), num_steps=2)
    assert results["a"] == results["b"]


def test_shapes_tokenizers_give_one_token_per_word():
    """The ShapesWorld generator's BPE reads every prompt and instruction word as one token (the
    project's 384-token BPE cut "triangles" into 5 pieces), and each fits models.generator's
    max_sequence_length with its eos."""
    from actors.tiny_flux import flux_tokenizer
    from cluster.shapes_models import SHAPES_VOCAB_SIZE, shapes_corpus
    from rollout.shapesworld.render import render_wrong
    from rollout.shapesworld.tasks import all_tasks

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

    from cluster.shapes_models import adaln_zero_
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
def test_reflect_training_on_own_images(warm_cache, tmp_path):
    """The warm start's generator draws and edits; the judge labels; the reasoner fine-tunes on a
    balanced mix and its measures are computed on the labels."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from cluster.shapes_selfreflect import (
        draw_own_images,
        evaluate_on_own_images,
        finetune_on_own_images,
        label_images,
    )
    from rollout.shapesworld.render import render_correct

    s = PretrainSettings(scale=0.01, eval_prompts=4)
    metas = build_splits().train[:4]
    own = draw_own_images(shapes_model_path("shapes-flux", warm_cache), metas, s, seed=0)
    redrawn = [m["prompt"] for m, ok in zip(metas, own.correct[:4], strict=True) if not ok]
    assert len(own) == 4 + len(redrawn) and own.prompts[4:] == redrawn  # one edit of each wrong image
    for ans, ok, fix in zip(own.answers, own.correct, own.fixes, strict=True):
        parsed = parse_answer(ans)
        assert parsed.well_formed and is_stop(parsed.answer) == ok and (fix is None) == ok
        assert ok or parsed.answer == fix
    renders = label_images([render_correct(m, np.random.default_rng(0)).image for m in metas], metas)
    assert renders.correct.all()  # the judge passes every ground-truth render
    vlm = tmp_path / "vlm"
    shutil.copytree(shapes_model_path("shapes-vlm", warm_cache), vlm)
    before = load_file(vlm / "model.safetensors")
    both = label_images(list(own.images) + list(renders.images), own.metas + renders.metas)
    pool = make_pool(build_splits().train, 4, seed=0)
    losses = finetune_on_own_images(vlm, both, pool, s, steps=2, lr=1e-3, gen=torch.Generator().manual_seed(0))
    assert len(losses) == 2 and all(np.isfinite(losses))
    after = load_file(vlm / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    m = evaluate_on_own_images(vlm, both)
    assert m["n"] == len(both) and m["n_correct"] == int(both.correct.sum()) >= 4
    assert 0.0 <= m["balanced_reflect_accuracy"] <= 1.0 and 0.0 <= m["stop_when_correct"] <= 1.0
    with pytest.raises(ValueError, match="need both kinds"):
        finetune_on_own_images(vlm, renders, pool, s, steps=1, lr=1e-3, gen=torch.Generator())

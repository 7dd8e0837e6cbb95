"""`robovlms pretrain`: frames rendered from Meta-World with what they show, texts written from it, each backbone's
own language-modelling loss, and a pre-training that is deterministic, resumable, cached and loadable."""

import shutil
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch

from robovlms.backbone import create_backbone
from robovlms.backbone.language_modeling import IGNORED, language_modeling_rows
from robovlms.errors import ConfigError, PluginError, UnknownNameError
from robovlms.pretraining import (
    FrameSettings,
    check_held_out,
    load_pretraining_config,
    pretrain,
    pretrained_path,
    pretraining_record,
)
from robovlms.pretraining.frames import MIN_PIXELS, frame_set
from robovlms.pretraining.module import PretrainingModule
from robovlms.pretraining.probe import ridge_probe
from robovlms.pretraining.text import caption, offset_text, view_text

FRAMES = {"tasks": ["reach", "push"], "scenes": "A", "episodes_per_task": 2, "frames_per_episode": 2,
          "cameras": ["rgb_gripper"], "max_steps": 20}


def settings(backbone="kosmos2", **overrides):
    return {"backbone": {"name": backbone}, "frames": FRAMES, "max_steps": 4, "batch_size": 2, "warmup_steps": 1,
            "validation_fraction": 0.25, "validate_every": 2, "validation_batches": 1, "checkpoint_every": 2,
            "log_every": 1, **overrides}


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def frames_root(tmp_path_factory):
    """A root holding the tests' frame set, rendered once."""
    root = tmp_path_factory.mktemp("pretraining")
    frame_set(FrameSettings(**FRAMES), root)
    return root


@pytest.fixture
def root(frames_root, tmp_path):
    """A fresh pre-training root with the rendered frames in it."""
    for frames in frames_root.glob("frames-*"):
        if frames.is_dir():
            shutil.copytree(frames, tmp_path / frames.name)
    return tmp_path


def weights(path):
    return {key: value.clone() for key, value in create_backbone("kosmos2", "pretrained", str(path))
            .model.state_dict().items()}


def test_a_view_records_each_objects_offset_from_the_gripper_and_its_box_when_seen(frames_root):
    frames = frame_set(FrameSettings(**FRAMES), frames_root)
    assert len(frames) == 2 * 1 * 2 * 2  # tasks x scenes x episodes x frames, one camera
    for view in range(len(frames)):
        row = frames.views.iloc[view]
        for thing in frames.objects(view):
            hand = np.array([row.hand_x, row.hand_y, row.hand_z])
            np.testing.assert_allclose(thing["offset"], np.array(thing["position"]) - hand, atol=2e-4)
            assert (thing["box"] is not None) == (thing["pixels"] >= MIN_PIXELS)
            if thing["box"]:
                x0, y0, x1, y1 = thing["box"]
                assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


def test_texts_say_only_what_the_view_shows():
    seen = {"name": "puck", "colour": "red", "position": [0.1, 0.6, 0.02], "offset": [0.03, -0.01, -0.19],
            "box": [0.1, 0.2, 0.3, 0.4], "pixels": 40}
    hidden = {**seen, "name": "wall", "colour": None, "box": None, "pixels": 0}
    assert caption([seen]) == "a red puck. the puck is 3 cm right, 1 cm behind and 19 cm below the gripper."
    assert caption([]) == "no object in view."
    assert offset_text([-0.004, 0.02, 0.0]) == "0 cm left, 2 cm ahead and 0 cm above the gripper"
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, target = view_text([hidden], "rgb_gripper", "grounding", rng, lambda phrase, box: "BOX")
        assert target == "it is not in view."


def test_the_loss_is_on_the_target_text_and_its_end_only():
    tokenizer = create_backbone("kosmos2", "tiny").tokenizer
    rows = language_modeling_rows(tokenizer, ([5], 3, [6]), ["push the puck", "a"], ["left", "right of it"])
    for row, labels, target in zip(rows.input_ids, rows.labels, ["left", "right of it"]):
        expected = [*tokenizer(target, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        assert labels[labels != IGNORED].tolist() == expected
    assert rows.image_slots.sum(dim=1).tolist() == [3, 3]


@pytest.mark.parametrize("name", ["kosmos2", "paligemma", "flamingo"])
def test_each_backbones_language_modeling_loss_trains_its_vision_tower_too(name):
    """The loss is the wrapped model's own, and the target depends on the image through it."""
    backbone = create_backbone(name, "tiny")
    images = backbone.preprocess_images(torch.randint(0, 255, (2, 1, 1, 64, 64, 3), dtype=torch.uint8))[:, 0, 0]
    loss = backbone.language_modeling_loss(images, ["find the puck.", "what colour is it?"],
                                           [backbone.grounded_phrase("the puck", (0.1, 0.2, 0.5, 0.6)), "red"])
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    tower = backbone.vision_modules()[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())


@pytest.mark.parametrize("name", ["kosmos2", "paligemma", "flamingo"])
def test_a_pretrained_directory_loads_as_size_pretrained_with_the_weights_it_trained(root, name):
    captured = {}

    class Capture(L.Callback):
        def on_train_end(self, trainer, module):
            captured.update({key: value.clone() for key, value in module.backbone.model.state_dict().items()})

    out = pretrain(settings(name), root, callbacks=[Capture()])
    loaded = create_backbone(name, "pretrained", str(out))
    assert loaded.size == "pretrained"
    state = loaded.model.state_dict()
    assert captured.keys() == state.keys()
    for key, value in captured.items():
        torch.testing.assert_close(state[key], value, msg=key)
    L.seed_everything(0, verbose=False)
    initial = create_backbone(name, "tiny").model.state_dict()
    assert any(not torch.equal(initial[key], value) for key, value in captured.items())
    record = pretraining_record(out)
    assert record["steps"] == 4 and np.isfinite(record["final_train_loss"]) and record["validation_views"] == 2


def test_pretraining_is_deterministic_for_a_seed(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("again")
    shutil.copytree(next(path for path in root.glob("frames-*") if path.is_dir()),
                    other / next(path for path in root.glob("frames-*") if path.is_dir()).name)
    first, second = weights(pretrain(settings(), root)), weights(pretrain(settings(), other))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)
    third = weights(pretrain(settings(seed=1), other))
    assert any(not torch.equal(first[key], third[key]) for key in first)


def test_a_finished_pretraining_is_found_and_not_run_again(root):
    out = pretrain(settings(), root)
    started = []

    class Started(L.Callback):
        def on_train_start(self, trainer, module):
            started.append(True)

    assert pretrain(settings(), root, callbacks=[Started()]) == out
    assert not started
    assert pretrain(settings(max_steps=5), root) != out  # other settings are another pre-training


def test_an_interrupted_pretraining_resumes_to_the_weights_of_an_uninterrupted_one(root, tmp_path_factory,
                                                                                   monkeypatch):
    straight = weights(pretrain(settings(), root))
    other = tmp_path_factory.mktemp("interrupted")
    original_step = PretrainingModule.training_step

    def stop_at_step_three(self, batch, batch_idx):
        if self.global_step == 3:
            raise Interrupted
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(PretrainingModule, "training_step", stop_at_step_three)
    with pytest.raises(Interrupted):
        pretrain(settings(), other)
    assert pretraining_record(pretrained_path(settings(), other)) is None
    monkeypatch.setattr(PretrainingModule, "training_step", original_step)
    resumed = weights(pretrain(settings(), other))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6, msg=key)


def test_bad_settings_are_refused_naming_the_valid_ones():
    with pytest.raises(UnknownNameError, match="'pour-tea'.*reach"):
        load_pretraining_config(settings(frames={**FRAMES, "tasks": ["pour-tea"]}))
    with pytest.raises(ConfigError, match="max_stepz"):
        load_pretraining_config(settings(max_stepz=3))
    with pytest.raises(PluginError, match="'gpt-scratch' cannot be pre-trained.*language_modeling_loss"):
        load_pretraining_config(settings("gpt-scratch"))


@pytest.mark.parametrize("frames, refused", [({"tasks": ["door-open"]}, "door-open"), ({"scenes": "AD"}, "D"),
                                             ({"scenes": "E"}, "E")])
def test_pretraining_may_not_see_an_evaluated_task_or_the_test_or_validation_scene(frames, refused):
    config = load_pretraining_config(settings(frames={**FRAMES, **frames}))
    with pytest.raises(ConfigError, match=f"{refused}.*must not see"):
        check_held_out(config, "metaworld", {"tasks": "demo"}, "ABC->D", "pretraining sim")


def test_the_probe_scores_linear_features_near_one_and_unrelated_ones_near_zero():
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(400, 3))
    episodes = np.repeat(np.arange(40), 10)
    linear = np.concatenate([targets @ rng.normal(size=(3, 16)), rng.normal(size=(400, 16))], axis=1)
    assert ridge_probe(linear + 0.01 * rng.normal(size=linear.shape), targets, episodes)["r2"] > 0.95
    assert ridge_probe(rng.normal(size=(400, 32)), targets, episodes)["r2"] < 0.1


def test_the_cli_refuses_bad_settings_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("frames: {scenes: XYZ}\n")
    failed = subprocess.run([sys.executable, "-m", "robovlms.cli", "pretrain", str(bad), "--root",
                             str(tmp_path / "root")], capture_output=True, text=True, check=False)
    assert failed.returncode != 0
    assert "unknown scene 'X'" in failed.stdout and "Traceback" not in failed.stdout + failed.stderr
    assert not (tmp_path / "root").exists()


def commit_trained_cell(run_dir, backbone, pretraining, seed, successes, episodes=8):
    """A committed trained cell of a sweep with a pretraining axis, with its probe."""
    from robovlms.results import CellResult, EpisodeRecord, write_cell_result, write_records

    cell_id = f"{backbone}-{pretraining}-s{seed}"
    label = f"{backbone} (tiny, random init)" if pretraining == "none" else \
        f"{backbone} (pretrained: data/pretrained/{backbone}-0123456789ab)"
    records = [EpisodeRecord(task="door-open", scene="D", instruction="open the door", seed=episode,
                             success=episode < successes, steps=50, seconds=0.1) for episode in range(episodes)]
    cell_dir = run_dir / "cells" / cell_id
    cell_dir.mkdir(parents=True)
    write_records(cell_dir, records)
    probe = {"r2_initial": 0.1, "error_cm_initial": 9.0, "r2_trained": 0.5 if pretraining == "sim" else 0.3,
             "error_cm_trained": 5.0, "position_r2_initial": 0.2, "position_r2_trained": 0.6, "r2_state_only": 0.05,
             "position_r2_state_only": 0.4, "frames": 64, "mean_error_cm": 12.0}
    write_cell_result(cell_dir, CellResult(
        cell_id=cell_id, status="complete", kind="trained", benchmark="metaworld", split="ABC->D", policy="trained",
        backbone=backbone, backbone_label=label, random_init=pretraining == "none", formulation="policy-head",
        history=1, chunk=4, data_fraction=1.0, seed=seed, episodes=episodes, successes=successes,
        success=successes / episodes,
        config={"backbone": {"name": backbone, "size": "tiny", "path": None} if pretraining == "none" else
                {"name": backbone, "size": "pretrained", "path": f"data/pretrained/{backbone}-0123456789ab"},
                "seed": seed}, probe=probe,
        axes={"backbone": backbone, "pretraining": pretraining, "seed": seed}))


def test_a_report_compares_pretrained_with_random_init_of_the_same_architecture(tmp_path):
    from robovlms.report.main_effects import main_effects_table, pairwise_table
    from robovlms.report.pretraining import probe_table
    from robovlms.report.runs import read_sweep_runs

    for backbone in ("kosmos2", "paligemma"):
        for seed in (0, 1):
            commit_trained_cell(tmp_path / "run", backbone, "none", seed, 3)
            commit_trained_cell(tmp_path / "run", backbone, "sim", seed, 6)
    runs = read_sweep_runs([tmp_path / "run"])
    assert runs.settings == []  # the backbone's label names its size and its weights' path: no columns of their own
    pairs = pairwise_table(runs).set_index("axis")
    assert pairs.loc["pretraining", "matched_cells"] == 4
    assert set(main_effects_table(runs).query("axis == 'backbone'").level) == {"kosmos2 (tiny)", "paligemma (tiny)"}
    probes = probe_table(runs).set_index(["configuration", "pretraining"])
    assert len(probes) == 4 and probes.seeds.eq(2).all()
    assert probes.loc[("kosmos2 (tiny) · policy-head · H=1 · L=4 · data 1", "sim"), "r2_trained"] == 0.5
    assert probes.loc[("kosmos2 (tiny) · policy-head · H=1 · L=4 · data 1", "sim"), "position_r2_trained"] == 0.6
    assert probes.position_r2_state_only.eq(0.4).all()


def test_the_report_gives_the_pretraining_effect_of_each_architecture_on_its_matched_seeds(tmp_path):
    from robovlms.report.main_effects import pretraining_effect_table
    from robovlms.report.runs import read_sweep_runs

    for seed, (kosmos2_random, paligemma_random) in enumerate([(10, 20), (12, 22), (8, 18)]):
        commit_trained_cell(tmp_path / "run", "kosmos2", "none", seed, kosmos2_random, episodes=40)
        commit_trained_cell(tmp_path / "run", "kosmos2", "sim", seed, kosmos2_random + 20, episodes=40)
        commit_trained_cell(tmp_path / "run", "paligemma", "none", seed, paligemma_random, episodes=40)
        commit_trained_cell(tmp_path / "run", "paligemma", "sim", seed, paligemma_random, episodes=40)
    commit_trained_cell(tmp_path / "run", "paligemma", "sim", 3, 40, episodes=40)  # no random-init seed 3
    effects = pretraining_effect_table(read_sweep_runs([tmp_path / "run"])).set_index("backbone")
    assert effects.matched_cells.to_dict() == {"kosmos2 (tiny)": 3, "paligemma (tiny)": 3}
    assert effects.loc["kosmos2 (tiny)", "difference"] == pytest.approx(0.5)
    assert effects.loc["kosmos2 (tiny)", "resolved"] and effects.loc["kosmos2 (tiny)", "p_holm"] < 0.05
    assert effects.loc["paligemma (tiny)", "difference"] == 0 and not effects.loc["paligemma (tiny)", "resolved"]
    assert effects.attrs["tests"] == 2


def test_a_sweep_with_a_pretraining_axis_is_checked_before_its_pretrained_directory_exists(tmp_path):
    """The pre-training cell comes first; the cell that trains from its directory (not there yet) is checked as the
    architecture it starts from."""
    import yaml

    from robovlms.sweep import expand_cells, load_sweep
    from robovlms.sweep.cells import check_cells_build

    sweep = {"name": "pt", "run_dir": str(tmp_path / "run"), "store": {"path": str(tmp_path / "store")},
             "benchmark": {"name": "metaworld", "split": "ABC->D", "options": {"tasks": "demo"}},
             "train": {"formulation": "one-step-continuous", "max_steps": 2},
             "grid": {"backbone": ["kosmos2"], "pretraining": ["none", "mini"]}, "baselines": [],
             "pretraining": {"path": str(tmp_path / "pretrained"),
                             "settings": {"mini": {k: v for k, v in settings().items() if k != "backbone"}}}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    cells = expand_cells(load_sweep(tmp_path / "sweep.yaml"))
    assert [cell.kind for cell in cells] == ["pretraining", "trained", "trained"]
    pretrained = next(cell for cell in cells if cell.needs is not None)
    assert pretrained.training["backbone"]["path"] == str(pretrained_path(cells[0].training, tmp_path / "pretrained"))
    assert not (tmp_path / "pretrained").exists()
    check_cells_build(cells, 4, 4, None)

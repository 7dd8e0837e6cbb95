"""Recipes: `recipe: robovlms` expands into RoboVLMs' definitions before validation, a setting beside it wins, the
run directory keeps every value, and the recipe trains and rolls out on Meta-World under every formulation."""

from pathlib import Path

import pytest
import torch
import yaml
from peft.tuners.lora import LoraLayer
from synthetic_store import write_synthetic_store

from robovlms.benchmarks.metaworld import MetaWorldBenchmark
from robovlms.errors import ConfigError, UnknownNameError
from robovlms.policy import policy_factory
from robovlms.recipes import ROBOVLMS
from robovlms.rollout import evaluate
from robovlms.sweep import expand_cells, load_sweep
from robovlms.sweep.cells import check_cell
from robovlms.training import load_config, load_formulation, train

FORMULATIONS = ["one-step-discrete", "one-step-continuous", "interleaved", "policy-head"]
CONTINUOUS = FORMULATIONS[1:]
HISTORY = {"one-step-discrete": 1, "one-step-continuous": 1, "interleaved": 2, "policy-head": 2}
# what a tiny model needs beside the recipe: a 1024-wide 4-layer LSTM is 30M parameters, and 255 action tokens
# overwritten in a 512-token vocabulary would be refused (half of it would become action tokens)
TINY = {"policy-head": {"fusion_width": 32}, "one-step-discrete": {"token_mode": "append"}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("synthetic") / "store")


def resolved(formulation="policy-head", options=None, **settings):
    return load_config({"store": "-", "run_dir": "-", "recipe": "robovlms",
                        "formulation": {"name": formulation, "options": options or {}}, **settings})


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_the_robovlms_recipe_sets_every_definition_of_the_formulation(formulation):
    config = resolved(formulation)
    expected = {**ROBOVLMS.every, **(ROBOVLMS.continuous if formulation in CONTINUOUS else {}),
                **ROBOVLMS.by_formulation.get(formulation, {})}
    assert config.formulation.options == expected
    assert config.backbone.model_dump(include={"freeze", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"}) \
        == {"freeze": "full", "lora_rank": 64, "lora_alpha": 16, "lora_dropout": 0.05, "lora_targets": "all-linear"}
    assert config.execution == "first"


def test_the_recipe_s_values_are_robovlms_definitions():
    """The values docs/formulations.md cites from RoboVLMs at 8adc1d2."""
    assert ROBOVLMS.every == {"action_normalisation": "clip", "action_clip": 0.65, "lrn_init": "zeros"}
    assert ROBOVLMS.continuous["gripper_weight"] == 0.01
    assert ROBOVLMS.continuous["head_width"] == [1024, 512, 256]
    assert ROBOVLMS.by_formulation["policy-head"] == {"head": "lstm", "fusion_width": 1024, "fusion_layers": 4}
    assert ROBOVLMS.by_formulation["one-step-discrete"]["bins"] == 255


def test_a_setting_beside_the_recipe_wins_key_by_key():
    config = resolved("policy-head", {"fusion_width": 64, "gripper_weight": 0.5},
                      backbone={"name": "kosmos2", "lora_rank": 16}, execution="chunk")
    assert config.formulation.options["fusion_width"] == 64 and config.formulation.options["gripper_weight"] == 0.5
    assert config.formulation.options["fusion_layers"] == 4  # the recipe's, beside the overridden ones
    assert (config.backbone.name, config.backbone.lora_rank, config.backbone.lora_alpha) == ("kosmos2", 16, 16)
    assert config.execution == "chunk"


def test_without_a_recipe_nothing_is_expanded():
    config = load_config({"store": "-", "run_dir": "-", "formulation": {"name": "policy-head"}})
    assert config.recipe is None and config.formulation.options == {} and config.backbone.lora_alpha is None


def test_an_unknown_recipe_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="unknown recipe 'openvla'; valid choices: robovlms"):
        load_config({"store": "-", "run_dir": "-", "recipe": "openvla"})


def test_a_bad_setting_beside_the_recipe_is_refused_as_without_it(store, tmp_path):
    with pytest.raises(ConfigError, match="gripper_weight must be a number at least 0, got -1"):
        train({"store": str(store.path), "run_dir": str(tmp_path / "run"), "recipe": "robovlms",
               "formulation": {"name": "one-step-continuous", "options": {"gripper_weight": -1.0}}})


def test_a_sweep_can_compare_the_recipe_with_the_defaults_as_an_axis(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "recipe", "run_dir": str(tmp_path / "runs"),
        "benchmark": {"name": "metaworld", "split": "ABC->D", "options": {"tasks": ["button-press-topdown"]}},
        "store": {"path": str(tmp_path / "store")},
        "train": {"formulation": "one-step-continuous"},
        "grid": {"recipe": [None, "robovlms"]}}))
    cells = [cell for cell in expand_cells(load_sweep(path)) if cell.kind == "trained"]
    assert [cell.axes["recipe"] for cell in cells] == [None, "robovlms"]
    assert len({cell.cell_id for cell in cells}) == 2


def test_the_run_directory_keeps_every_value_of_the_recipe_and_rebuilds_its_lora(store, tmp_path):
    run_dir = train({"store": str(store.path), "run_dir": str(tmp_path / "run"), "recipe": "robovlms",
                     "backbone": {"name": "kosmos2", "freeze": "lora"},
                     "formulation": {"name": "one-step-continuous"}, "chunk": 2, "batch_size": 4, "max_steps": 2,
                     "checkpoint_every": 2, "log_every": 1})
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["recipe"] == "robovlms"
    assert {**ROBOVLMS.every, **ROBOVLMS.continuous}.items() <= saved["formulation"]["options"].items()
    assert saved["backbone"]["lora_alpha"] == 16 and saved["backbone"]["lora_dropout"] == 0.05
    assert load_config(saved) == load_config(run_dir / "config.yaml")
    formulation, _ = load_formulation(run_dir)
    assert torch.count_nonzero(formulation.lrn) > 0  # trained from zeros
    adapters = [module for module in formulation.backbone.modules() if isinstance(module, LoraLayer)]
    assert adapters and {adapter.scaling["default"] for adapter in adapters} == {16 / 64}


@pytest.mark.slow
@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_the_recipe_trains_and_rolls_out_on_metaworld_with_every_formulation(demo_store, tmp_path, formulation):
    settings = {"store": str(demo_store.path), "run_dir": str(tmp_path / "run"), "recipe": "robovlms",
                "backbone": {"name": "kosmos2"},
                "formulation": {"name": formulation, "options": TINY.get(formulation, {})},
                "history": HISTORY[formulation], "chunk": 2, "cameras": ["rgb_gripper"], "batch_size": 4,
                "max_steps": 3, "checkpoint_every": 3, "log_every": 1}
    run_dir = train(settings)
    benchmark = MetaWorldBenchmark(tasks=["button-press-topdown", "door-open"], image_size=64,
                                   cameras=["rgb_gripper"], max_steps=4)
    records = evaluate(benchmark, policy_factory(run_dir), benchmark.evaluation_episodes("ABC->D", 1),
                       progress=False)
    assert len(records) == 2 and all(record.steps == 4 for record in records)
    assert load_config(run_dir / "config.yaml").formulation.options["action_normalisation"] == "clip"


def test_the_recipe_s_discrete_tokens_on_a_tiny_vocabulary_are_refused_naming_the_setting_to_add(store, tmp_path):
    with pytest.raises(ConfigError, match="token_mode overwrite would turn 255 of the .*use token_mode: append"):
        train({"store": str(store.path), "run_dir": str(tmp_path / "run"), "recipe": "robovlms",
               "formulation": {"name": "one-step-discrete"}, "chunk": 2, "batch_size": 4, "max_steps": 1})


def test_every_trained_cell_of_calvin_abc_d_validates_with_the_robovlms_recipe():
    sweep = load_sweep(Path(__file__).resolve().parents[1] / "experiments" / "calvin_abc_d.yaml")
    cells = [cell for cell in expand_cells(sweep) if cell.kind == "trained"]
    for cell in cells:
        check_cell(cell)
        config = load_config({**cell.training, "store": "-", "run_dir": "-"})
        assert config.recipe == "robovlms"
        assert ROBOVLMS.every.items() <= config.formulation.options.items()
    assert {cell.training["formulation"]["name"] for cell in cells} == set(FORMULATIONS)

"""The formulation conformance kit (robovlms.testing, `robovlms check-formulation`): every built-in formulation and
the GRU-head example plugin pass it on every built-in backbone, and each check catches the mistake it is for."""

import importlib
import importlib.util
import sys

import pytest
import torch
from plugin_distribution import install_plugin
from rich.console import Console
from typer.testing import CliRunner

from robovlms import cli
from robovlms.backbone import create_backbone
from robovlms.errors import ConfigError
from robovlms.testing import (
    assert_formulation_conforms,
    build_formulation,
    check_act,
    check_batching,
    check_checkpoint,
    check_device,
    check_formulation,
    check_loss,
    check_predict,
    check_rollout_encoding,
    check_seeding,
    run_check,
)

BUILT_IN = ["one-step-discrete", "one-step-continuous", "interleaved", "policy-head"]
GRU_HEAD_INSTALLED = importlib.util.find_spec("robovlms_gru_head") is not None

BROKEN_FORMULATIONS = '''
import torch
from torch import nn

from robovlms.formulations.one_step_continuous import OneStepContinuous
from robovlms.formulations.policy_head import PolicyHead


class UnusedLayer(OneStepContinuous):
    name = "unused-layer"
    description = "holds a layer its loss never uses"

    def __init__(self, *args, **settings):
        super().__init__(*args, **settings)
        self.forgotten = nn.Linear(4, 4)


class CountsPadding(OneStepContinuous):
    name = "counts-padding"
    description = "ignores action_mask"

    def loss(self, batch, generator=None):
        return super().loss({**batch, "action_mask": torch.ones_like(batch["action_mask"])}, generator)


class GripperLogits(OneStepContinuous):
    name = "gripper-logits"
    description = "predicts the gripper's logit, not its probability"

    def predict(self, encoded, instructions, generator=None):
        condition = self(encoded, instructions)[:, -1]
        arm, gripper_logits = self.head(condition, generator)
        return torch.cat([arm, 5 * gripper_logits.unsqueeze(-1)], dim=-1)


class ActsNormalised(OneStepContinuous):
    name = "acts-normalised"
    description = "act returns predict's chunk as it is"

    @torch.no_grad()
    def act(self, images, state, instructions, generator=None):
        return self.predict(self.encode(images, state, instructions), instructions, generator)


class WindowNormalisedState(PolicyHead):
    name = "window-normalised-state"
    description = "centres each frame's state on its window's mean"

    def encode(self, images, state, instructions):
        return super().encode(images, state - state.mean(dim=1, keepdim=True), instructions)


class BatchCentred(OneStepContinuous):
    name = "batch-centred"
    description = "centres the condition on the batch's mean"

    def forward(self, encoded, instructions):
        condition = super().forward(encoded, instructions)
        return condition - condition.mean(dim=0, keepdim=True)


class MakesCpuTensors(OneStepContinuous):
    name = "makes-cpu-tensors"
    description = "adds a bias made on the CPU"

    def forward(self, encoded, instructions):
        condition = super().forward(encoded, instructions)
        return condition + torch.zeros(condition.shape[-1])


class GlobalNoise(OneStepContinuous):
    name = "global-noise"
    description = "draws noise from torch's global generator"

    def forward(self, encoded, instructions):
        condition = super().forward(encoded, instructions)
        return condition + 0.1 * torch.randn(condition.shape, device=condition.device)


class LazyScale(OneStepContinuous):
    name = "lazy-scale"
    description = "a scale kept outside its state dict"

    def __init__(self, *args, **settings):
        super().__init__(*args, **settings)
        self.scale = torch.rand(1) + 0.5

    def forward(self, encoded, instructions):
        return super().forward(encoded, instructions) * self.scale
'''
BROKEN = ["unused-layer", "counts-padding", "gripper-logits", "acts-normalised", "window-normalised-state",
          "batch-centred", "makes-cpu-tensors", "global-noise", "lazy-scale"]


@pytest.fixture
def broken(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "broken_formulations", BROKEN_FORMULATIONS,
                   {"robovlms.formulations": {name: f"broken_formulations:{''.join(part.title() for part in name.split('-'))}"
                                              for name in BROKEN}})


def formulation(name, backbone="gpt-scratch", **options):
    torch.manual_seed(0)
    return build_formulation(name, create_backbone(backbone), **options)


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_formulation_passes_the_kit_on_every_built_in_backbone(name):
    results = assert_formulation_conforms(name)
    assert set(results) == {"kosmos2", "paligemma", "flamingo", "openflamingo", "gpt-scratch", "film-convnet"}


@pytest.mark.skipif(not GRU_HEAD_INSTALLED, reason="pip install -e examples/robovlms-gru-head-plugin")
def test_the_gru_head_example_plugin_passes_the_kit_on_every_built_in_backbone():
    assert_formulation_conforms("gru-head", gru_width=32)


@pytest.mark.parametrize("objective", ["flow-matching", "diffusion"])
def test_a_sampling_action_objective_passes_the_kit(objective):
    assert_formulation_conforms("policy-head", backbones=["gpt-scratch"], objective=objective)


@pytest.mark.parametrize(("name", "check", "reason"), [
    ("unused-layer", check_loss, r"parameters \['forgotten.weight', 'forgotten.bias'\] get no gradient"),
    ("counts-padding", check_loss, "whether or not the actions past the episode's end count: action_mask is not read"),
    ("gripper-logits", check_predict, "the gripper ranges .* probability of closing, in \\[0, 1\\]"),
    ("acts-normalised", check_act, "differs from predict's chunk un-normalised"),
    ("window-normalised-state", check_rollout_encoding, "depends on the other frames of its window"),
    ("batch-centred", check_batching, "window 0's chunk alone and in a batch differ"),
    ("makes-cpu-tensors", check_device, "Tensor|device"),
    ("global-noise", check_seeding, "draws from torch's global generator"),
    ("lazy-scale", check_checkpoint, "the rebuilt formulation's chunks differ"),
], ids=BROKEN)
def test_each_check_catches_the_mistake_it_is_for(broken, name, check, reason):
    with pytest.raises(Exception, match=reason):
        check(formulation(name))


def test_the_kit_reports_a_crash_inside_a_check_with_where_it_was_raised(broken):
    results = check_formulation("makes-cpu-tensors", ["gpt-scratch"])["gpt-scratch"]
    device = next(result for result in results if result.check == "device")
    assert device.status == "fail" and "RuntimeError" in device.reason and "broken_formulations.py" in device.reason


def test_a_crash_inside_a_plugin_package_is_located_by_its_package_not_by_init_py_alone(tmp_path, monkeypatch):
    (tmp_path / "crashing_plugin").mkdir()
    (tmp_path / "crashing_plugin" / "__init__.py").write_text("def encode():\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "crashing_plugin", raising=False)
    result = run_check("predict", importlib.import_module("crashing_plugin").encode)
    assert result.reason == "RuntimeError: boom (crashing_plugin/__init__.py:2)"


def test_a_formulation_option_the_formulation_does_not_take_is_one_config_error():
    with pytest.raises(ConfigError, match="unknown option.*headd.*valid options"):
        check_formulation("policy-head", ["gpt-scratch"], headd="lstm")


@pytest.fixture
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=300))


def test_check_formulation_prints_a_table_of_checks_by_backbone(wide_console):
    result = CliRunner().invoke(cli.app, ["check-formulation", "policy-head", "--backbone", "gpt-scratch",
                                          "--backbone", "film-convnet", "--option", "fusion_width=32"])
    assert result.exit_code == 0, result.output
    assert "gpt-scratch" in result.output and "film-convnet" in result.output
    assert all(check in result.output for check in ("loss", "rollout encoding", "device", "checkpoint"))


def test_check_formulation_exits_1_naming_each_failure(broken, wide_console):
    result = CliRunner().invoke(cli.app, ["check-formulation", "batch-centred", "--backbone", "gpt-scratch"])
    assert result.exit_code == 1
    assert "gpt-scratch / batching: window 0's chunk alone and in a batch differ" in result.output

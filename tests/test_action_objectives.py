"""Action objectives (regression, flow-matching, diffusion) behind every continuous formulation: learning and acting
on every backbone, their settings, reproducible sampling, inference cost, run directories and sweep grids."""

import numpy as np
import pytest
import torch
import yaml
from synthetic_store import write_synthetic_store

from robovlms.action_objectives import OBJECTIVES
from robovlms.backbone import create_backbone
from robovlms.benchmark import EpisodeSpec, Observation
from robovlms.data.windows import WindowDataset
from robovlms.errors import ConfigError, UnknownNameError
from robovlms.formulation import create_formulation
from robovlms.policy import CheckpointPolicy, load_policy
from robovlms.results import read_cell_results
from robovlms.training import train

BACKBONES = ["gpt-scratch", "kosmos2", "paligemma", "flamingo", "film-convnet"]
GENERATIVE = ["flow-matching", "diffusion"]
HISTORY = {"one-step-continuous": 1, "interleaved": 3, "policy-head": 3}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("synthetic") / "store")


def make_formulation(store, objective, name="one-step-continuous", backbone="gpt-scratch", **options):
    torch.manual_seed(0)
    return create_formulation(name, create_backbone(backbone), store.action_statistics, store.state_statistics,
                              history=HISTORY[name], chunk=4, use_state=True, objective=objective, **options)


def training_batch(store, formulation):
    return WindowDataset(store, formulation.history, formulation.chunk).__getitems__(list(range(0, 48, 6)))


def losses_while_training(formulation, batch, steps=20):
    """The losses of `steps` AdamW steps, each drawing the same noise and times, so that the loss is a function of
    the weights alone and must fall."""
    optimiser = torch.optim.AdamW(formulation.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss, metrics = formulation.loss(batch, torch.Generator().manual_seed(0))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert {"arm_loss", "arm_error", "gripper_accuracy"} <= set(metrics)
    return losses


def act(formulation, batch, seed=0, windows=3):
    return formulation.act(batch["images"][:windows], batch["state"][:windows], batch["instruction"][:windows],
                           torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_learns_and_acts_on_every_backbone(store, objective, backbone):
    formulation = make_formulation(store, objective, backbone=backbone)
    batch = training_batch(store, formulation)
    losses = losses_while_training(formulation, batch)
    assert losses[-1] < 0.8 * losses[0], losses
    actions = act(formulation.eval(), batch)
    assert actions.shape == (3, formulation.chunk, formulation.action_dim) and torch.isfinite(actions).all()
    arm_low, arm_high = formulation.actions.arm.low, formulation.actions.arm.high
    assert ((actions[..., :-1] >= arm_low - 1e-5) & (actions[..., :-1] <= arm_high + 1e-5)).all()
    assert set(actions[..., -1].unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("name", ["interleaved", "policy-head"])
@pytest.mark.parametrize("objective", GENERATIVE)
def test_the_history_formulations_get_the_generative_objectives_through_the_shared_head(store, objective, name):
    formulation = make_formulation(store, objective, name)
    batch = training_batch(store, formulation)
    losses = losses_while_training(formulation, batch)
    assert losses[-1] < 0.8 * losses[0], losses
    assert act(formulation.eval(), batch).shape == (3, formulation.chunk, formulation.action_dim)


def test_l1_regression_trains_on_the_absolute_error(store):
    formulation = make_formulation(store, "regression", arm_loss="l1")
    _, metrics = formulation.loss(training_batch(store, formulation))
    torch.testing.assert_close(metrics["arm_loss"], metrics["arm_error"])  # the loss is the error it reports


@pytest.mark.parametrize("options, error, message", [
    ({"objective": "score-matching"}, UnknownNameError,
     "action objective 'score-matching'; valid choices: diffusion, flow-matching, regression"),
    ({"arm_loss": "l2"}, UnknownNameError, "arm loss 'l2'; valid choices: huber, l1, mse"),
    ({"objective": "flow-matching", "arm_loss": "l1"}, ConfigError, "arm_loss l1 is regression's"),
    ({"objective": "diffusion", "denoising_steps": 0}, ConfigError, "denoising_steps must be a positive integer"),
    ({"expert_width": 2.5}, ConfigError, r"option expert_width: .*integer.*\(got 2.5\)"),
    ({"denoising_step": 4}, ConfigError, "unknown option.*denoising_step.*valid options: .*denoising_steps"),
])
def test_a_bad_objective_setting_is_refused_naming_the_valid_ones(store, options, error, message):
    objective = options.pop("objective", "regression")
    with pytest.raises(error, match=message):
        make_formulation(store, objective, **options)


@pytest.mark.parametrize("objective", GENERATIVE)
def test_sampling_is_reproducible_under_a_seed_and_differs_between_seeds(store, objective):
    formulation = make_formulation(store, objective).eval()
    batch = training_batch(store, formulation)
    torch.testing.assert_close(act(formulation, batch, seed=1), act(formulation, batch, seed=1), rtol=0, atol=0)
    assert not torch.equal(act(formulation, batch, seed=1)[..., :-1], act(formulation, batch, seed=2)[..., :-1])


def observation(batch, index):
    return Observation(images={"rgb_static": batch["images"][index, -1, 0].numpy()},
                       state=batch["state"][index, -1].numpy(), instruction=batch["instruction"][index])


@pytest.mark.parametrize("objective", GENERATIVE)
def test_the_rollout_policy_draws_its_noise_from_the_episode_seed(store, objective):
    formulation = make_formulation(store, objective).eval()
    batch = training_batch(store, formulation)
    policy = CheckpointPolicy(formulation, ["rgb_static"], execution="first")

    def episode(seed):
        policy.reset(EpisodeSpec("button-press-topdown", "D", batch["instruction"][0], seed))
        return np.stack([policy.step(observation(batch, index)) for index in range(4)])

    np.testing.assert_array_equal(episode(7), episode(7))
    assert not np.array_equal(episode(7), episode(8))


@pytest.mark.parametrize("objective, expert_passes", [("regression", 0), ("flow-matching", 10), ("diffusion", 6)])
def test_a_step_runs_the_backbone_once_and_the_expert_once_per_denoising_step(store, objective, expert_passes):
    steps = {"regression": {}, "flow-matching": {"denoising_steps": 10}, "diffusion": {"denoising_steps": 6}}
    formulation = make_formulation(store, objective, **steps[objective]).eval()
    calls = {"backbone": 0, "expert": 0}
    formulation.backbone.register_forward_hook(lambda *_: calls.__setitem__("backbone", calls["backbone"] + 1))
    if expert_passes:
        formulation.head.expert.register_forward_hook(lambda *_: calls.__setitem__("expert", calls["expert"] + 1))
    act(formulation, training_batch(store, formulation), windows=2)
    assert calls == {"backbone": 1, "expert": expert_passes}


def test_regression_keeps_the_weights_of_the_mlp_head_so_earlier_run_directories_load(store):
    formulation = make_formulation(store, "regression")
    head = {key for key in formulation.state_dict() if key.startswith("head.")}
    assert head == {f"head.mlp.{layer}.{kind}" for layer in (0, 2, 4) for kind in ("weight", "bias")}
    assert formulation.head.mlp[-1].out_features == formulation.chunk * formulation.action_dim


@pytest.mark.parametrize("objective", GENERATIVE)
def test_a_trained_generative_policy_is_rebuilt_from_its_run_directory_with_its_expert(store, tmp_path, objective):
    run_dir = train({"store": str(store.path), "run_dir": str(tmp_path / "run"), "chunk": 4, "batch_size": 8,
                     "max_steps": 4, "checkpoint_every": 4, "log_every": 1,
                     "formulation": {"name": "policy-head", "options": {"objective": objective, "head": "mlp",
                                                                        "denoising_steps": 3}},
                     "history": 2, "frame_stride": 4, "execution": "chunk"})
    formulation = load_policy(run_dir).formulation
    assert formulation.config.objective == objective and formulation.config.denoising_steps == 3
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(key.startswith("formulation.head.expert.") for key in trained)
    for key, value in formulation.state_dict().items():
        torch.testing.assert_close(value, trained[f"formulation.{key}"])
    batch = WindowDataset(store, 2, 4, frame_stride=4).__getitems__([0, 5])
    untrained = make_formulation(store, objective, "policy-head", head="mlp", denoising_steps=3).eval()
    assert not torch.allclose(act(formulation, batch, windows=2), act(untrained, batch, windows=2))
    torch.testing.assert_close(act(formulation, batch, windows=2), act(load_policy(run_dir).formulation, batch,
                                                                         windows=2), rtol=0, atol=0)


@pytest.mark.slow
def test_a_sweep_takes_the_objective_as_a_grid_axis_and_records_it(tmp_path, demo_store):
    from robovlms.sweep import run_sweep

    sweep = {"name": "objectives", "run_dir": str(tmp_path / "run"),
             "benchmark": {"name": "metaworld", "split": "ABC->D",
                           "options": {"tasks": ["button-press-topdown"], "max_steps": 15}},
             "store": {"path": str(demo_store.path)},
             "train": {"max_steps": 2, "batch_size": 4, "chunk": 2, "checkpoint_every": 2, "log_every": 1,
                       "cameras": ["rgb_static"], "execution": "chunk", "formulation": "one-step-continuous",
                       "backbone": {"options": {"hidden_size": 32, "layers": 1}}},
             "grid": {"formulation.options.objective": list(OBJECTIVES)}, "baselines": [],
             "evaluation": {"episodes_per_task": 1, "latency_steps": 2}}
    path = tmp_path / "objectives.yaml"
    path.write_text(yaml.safe_dump(sweep))
    status = run_sweep(path)
    assert (status.cells, status.done, status.failed) == (3, 3, 0)
    results = read_cell_results(tmp_path / "run")
    assert sorted(result.action_objective for result in results) == [
        "diffusion (10 steps)", "flow-matching (10 steps)", "regression (huber)"]
    assert {result.config["formulation"]["name"] for result in results} == {"one-step-continuous"}


# ---- RoboVLMs' action head as options ----------------------------------------------------------------------------

def test_the_gripper_weight_scales_the_gripper_loss_beside_the_arm_loss(store):
    losses = {}
    for weight in (0.1, 0.01):
        formulation = make_formulation(store, "regression", gripper_weight=weight)
        loss, metrics = formulation.loss(training_batch(store, formulation))
        torch.testing.assert_close(loss, metrics["arm_loss"] + weight * metrics["gripper_loss"])
        losses[weight] = (loss, metrics["gripper_loss"])
    torch.testing.assert_close(losses[0.1][0] - losses[0.01][0], 0.09 * losses[0.1][1])  # same weights: same seed
    with pytest.raises(ConfigError, match="gripper_weight must be a number at least 0, got -1"):
        make_formulation(store, "regression", gripper_weight=-1.0)


def linear_layers(module):
    return [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear)]


def test_head_width_as_a_list_gives_those_hidden_layers_with_the_chosen_activation(store):
    head = make_formulation(store, "regression", head_width=[32, 16, 8], head_activation="relu").head
    assert [(layer.in_features, layer.out_features) for layer in linear_layers(head.mlp)] == \
        [(64, 32), (32, 16), (16, 8), (8, 4 * 4)]  # condition 64 -> chunk 4 x (arm 3 + gripper 1)
    assert {type(layer) for layer in head.mlp if not isinstance(layer, torch.nn.Linear)} == {torch.nn.ReLU}
    default = make_formulation(store, "regression").head
    assert [layer.out_features for layer in linear_layers(default.mlp)] == [256, 256, 16]
    assert torch.nn.GELU in {type(layer) for layer in default.mlp}


def test_a_separate_gripper_head_reads_the_gripper_from_an_mlp_of_its_own(store):
    formulation = make_formulation(store, "regression", gripper_head="separate")
    assert linear_layers(formulation.head.mlp)[-1].out_features == 4 * 3  # the arm alone
    assert linear_layers(formulation.head.gripper)[-1].out_features == 4
    batch = training_batch(store, formulation)
    with torch.no_grad():
        torch.nn.init.zeros_(linear_layers(formulation.head.gripper)[-1].weight)
        torch.nn.init.constant_(linear_layers(formulation.head.gripper)[-1].bias, 3.0)
    closed = formulation.act(batch["images"][:2], batch["state"][:2], batch["instruction"][:2])[..., -1]
    assert (closed == 1.0).all()  # sigmoid(3) > 0.5: closed, from the gripper MLP alone


def test_xavier_head_init_starts_every_linear_of_the_objective_xavier_uniform_with_zero_biases(store):
    head = make_formulation(store, "regression", head_init="xavier", head_width=[64, 32]).head
    for layer in linear_layers(head):
        bound = (6 / (layer.in_features + layer.out_features)) ** 0.5
        assert torch.count_nonzero(layer.bias) == 0
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.8 * bound  # spread over the whole Xavier range, not PyTorch's default
    default = make_formulation(store, "regression").head
    assert all(torch.count_nonzero(layer.bias) > 0 for layer in linear_layers(default))


@pytest.mark.parametrize("options, message", [
    ({"head_activation": "tanh"}, "head activation 'tanh'; valid choices: gelu, relu"),
    ({"gripper_head": "both"}, "gripper head 'both'; valid choices: separate, shared"),
    ({"head_init": "orthogonal"}, "head init 'orthogonal'; valid choices: default, xavier"),
    ({"head_width": []}, r"head_width must be a positive integer or a non-empty list of them, got \[\]"),
    ({"head_width": [32, 0]}, r"head_width must be .*got \[32, 0\]"),
])
def test_a_bad_head_option_is_refused_naming_the_valid_ones(store, options, message):
    with pytest.raises((ConfigError, UnknownNameError), match=message):
        make_formulation(store, "regression", **options)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_robovlms_head_options_learn_with_every_objective(store, objective):
    formulation = make_formulation(store, objective, "policy-head", head_width=[64, 32, 16], head_activation="relu",
                                   gripper_head="separate", head_init="xavier", gripper_weight=0.01)
    losses = losses_while_training(formulation, training_batch(store, formulation))
    assert losses[-1] < 0.8 * losses[0], losses

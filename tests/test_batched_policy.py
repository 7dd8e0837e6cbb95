"""The batched rollout policy: an episode's actions are bitwise the same alone and in any batch, for every
formulation (the generative objectives' noise included), and a formulation that cannot be batched is stepped one
episode at a time."""

import numpy as np
import pytest
import torch
from robovlms.formulations.one_step_continuous import OneStepContinuous
from synthetic_store import write_synthetic_store

from robovlms.backbone import create_backbone
from robovlms.benchmark import Observation
from robovlms.formulation import create_formulation
from robovlms.serving.batch_invariance import BatchInvariance
from robovlms.serving.batched_policy import BatchedPolicy

# episodes of three context lengths, two batched with others of their length and one alone
INSTRUCTIONS = ["open the door", "press the button from the top", "open the door", "pick",
                "press the button from the top", "open the door"]
VARIANTS = {
    "one-step-continuous regression": ("one-step-continuous", {}),
    "one-step-continuous flow-matching": ("one-step-continuous", {"objective": "flow-matching",
                                                                  "denoising_steps": 3}),
    "one-step-continuous diffusion": ("one-step-continuous", {"objective": "diffusion", "denoising_steps": 3}),
    "one-step-discrete parallel lm": ("one-step-discrete", {"bins": 16}),
    "one-step-discrete autoregressive": ("one-step-discrete", {"bins": 8, "decoding": "autoregressive"}),
    "one-step-discrete mlp head": ("one-step-discrete", {"bins": 16, "action_head": "mlp"}),
    "interleaved once": ("interleaved", {}),
    "interleaved per-frame": ("interleaved", {"instruction": "per-frame"}),
    "policy-head lstm": ("policy-head", {}),
    "policy-head gpt": ("policy-head", {"head": "gpt"}),
    "policy-head mlp flow-matching": ("policy-head", {"head": "mlp", "objective": "flow-matching",
                                                      "denoising_steps": 3}),
}
BACKBONES = ["gpt-scratch", "kosmos2", "paligemma", "flamingo", "film-convnet"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("synthetic") / "store")


def make_formulation(store, variant, backbone="gpt-scratch"):
    name, options = VARIANTS[variant]
    torch.manual_seed(0)
    history = 1 if name.startswith("one-step") else 2
    return create_formulation(name, create_backbone(backbone), store.action_statistics, store.state_statistics,
                              history=history, chunk=2, use_state=True, **options).eval()


def observations(formulation, episodes, steps, seed=0):
    rng = np.random.default_rng(seed)
    S = formulation.backbone.image_size
    return [[Observation(images={"rgb_static": rng.integers(0, 256, (S, S, 3), dtype=np.uint8)},
                         state=rng.standard_normal(4).astype(np.float32), instruction="")
             for _ in range(steps)] for _ in range(episodes)]


def roll_out(formulation, frames, batches, dtype=None, instructions=INSTRUCTIONS):
    """Each episode's actions when the episodes step together in `batches` (lists of episode indices)."""
    policy = BatchedPolicy(formulation, ["rgb_static"], execution="chunk", frame_stride=2, autocast_dtype=dtype)
    episodes = [policy.new_episode(instructions[i], seed=i) for i in range(len(frames))]
    actions = [[] for _ in frames]
    for t in range(len(frames[0])):
        for batch in batches:
            for i, action in zip(batch, policy.step([(episodes[i], frames[i][t]) for i in batch])):
                actions[i].append(action)
    return [np.stack(a) for a in actions]


def assert_batching_changes_nothing(formulation, dtype=None, episodes=6, steps=3):
    frames = observations(formulation, episodes, steps)
    alone = roll_out(formulation, frames, [[i] for i in range(episodes)], dtype)
    together = roll_out(formulation, frames, [list(range(episodes))], dtype)
    mixed = roll_out(formulation, frames, [list(range(0, episodes, 2)), list(range(1, episodes, 2))], dtype)
    for i in range(episodes):
        assert np.array_equal(alone[i], together[i]), f"episode {i}: {np.abs(alone[i] - together[i]).max():.3g}"
        assert np.array_equal(alone[i], mixed[i]), f"episode {i}: {np.abs(alone[i] - mixed[i]).max():.3g}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_episode_acts_bitwise_the_same_alone_and_in_any_batch(store, variant):
    assert_batching_changes_nothing(make_formulation(store, variant))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES[1:])
@pytest.mark.parametrize("variant", ["interleaved per-frame", "policy-head mlp flow-matching",
                                     "one-step-continuous diffusion", "one-step-discrete autoregressive"])
def test_batching_changes_no_action_on_any_backbone(store, variant, backbone):
    assert_batching_changes_nothing(make_formulation(store, variant, backbone))


@pytest.mark.parametrize("backbone", ["gpt-scratch", "film-convnet"])
@pytest.mark.parametrize("variant", ["policy-head mlp flow-matching", "one-step-continuous regression"])
def test_batching_changes_no_action_in_bfloat16(store, variant, backbone):
    """oneDNN's bfloat16 kernels choose layouts and paths by batch size too (robovlms/serving/batch_invariance.py)."""
    formulation = make_formulation(store, variant, backbone).to(torch.bfloat16)
    assert_batching_changes_nothing(formulation, dtype=torch.bfloat16, episodes=4, steps=2)


def test_without_padding_the_few_row_layers_a_batch_would_change_the_actions(store, monkeypatch):
    """What the padding is for: MKL's products of fewer than MIN_ROWS rows reduce in another order (if this fails,
    the CPU's kernels no longer need it and the padding can go)."""
    formulation = make_formulation(store, "one-step-continuous regression")
    monkeypatch.setattr(BatchInvariance.of(formulation), "rows", 1)
    frames, instructions = observations(formulation, 4, 1), ["open the door"] * 4
    alone = roll_out(formulation, frames, [[i] for i in range(4)], instructions=instructions)
    together = roll_out(formulation, frames, [[0, 1, 2, 3]], instructions=instructions)
    assert not all(np.array_equal(a, b) for a, b in zip(alone, together))


def test_the_episodes_of_one_forward_pass_share_their_context_length(store, monkeypatch):
    formulation = make_formulation(store, "interleaved once", "kosmos2")
    batches = []
    predict = formulation.predict
    monkeypatch.setattr(formulation, "predict", lambda window, instructions, generator: (
        batches.append(list(instructions)), predict(window, instructions, generator))[1])
    policy = BatchedPolicy(formulation, ["rgb_static"])
    frames = observations(formulation, 3, 1)
    episodes = [policy.new_episode(instruction) for instruction in ["open the door", "pick", "open the door"]]
    policy.step([(episode, frame[0]) for episode, frame in zip(episodes, frames)])
    assert sorted(batches) == [["open the door", "open the door"], ["pick"]]


class UnbatchedFormulation(OneStepContinuous):
    """A third-party formulation derived from a built-in one, which does not itself declare batched rollouts."""

    name = "third-party"


def test_a_formulation_that_cannot_be_batched_is_stepped_one_episode_at_a_time_and_says_so(store):
    torch.manual_seed(0)
    formulation = UnbatchedFormulation(create_backbone("gpt-scratch"), store.action_statistics,
                                       store.state_statistics, use_state=True).eval()
    rows = []
    predict = formulation.predict
    formulation.predict = lambda window, instructions, generator: (rows.append(len(instructions)),
                                                                   predict(window, instructions, generator))[1]
    with pytest.warns(UserWarning, match="'third-party' \\(UnbatchedFormulation\\) does not set batched_rollouts.*one at a time"):
        policy = BatchedPolicy(formulation, ["rgb_static"])
    frames = observations(formulation, 3, 1)
    episodes = [policy.new_episode(instruction) for instruction in INSTRUCTIONS[:3]]
    actions = policy.step([(episode, frame[0]) for episode, frame in zip(episodes, frames)])
    assert rows == [1, 1, 1] and len(actions) == 3


def test_an_episode_reset_with_the_same_seed_draws_the_same_noise_and_another_seed_other_noise(store):
    formulation = make_formulation(store, "one-step-continuous flow-matching")
    policy = BatchedPolicy(formulation, ["rgb_static"])
    frame = observations(formulation, 1, 1)[0][0]
    episode = policy.new_episode("open the door", seed=7)
    first = policy.step([(episode, frame)])[0]
    policy.reset(episode, "open the door", seed=7)
    assert np.array_equal(policy.step([(episode, frame)])[0], first)
    policy.reset(episode, "open the door", seed=8)
    assert not np.array_equal(policy.step([(episode, frame)])[0], first)

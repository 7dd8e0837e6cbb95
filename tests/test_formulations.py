"""The four formulations: action spaces, learning on every built-in backbone, and the rollout policy."""

import numpy as np
import pytest
import torch
from brief_training import train_briefly
from synthetic_store import write_synthetic_store

from robovlms.backbone import create_backbone
from robovlms.benchmark import EpisodeSpec, Observation
from robovlms.data.store import Statistics
from robovlms.data.windows import WindowDataset
from robovlms.errors import ConfigError, UnknownNameError
from robovlms.formulation import FORMULATIONS, ActionDiscretiser, ActionNormaliser, create_formulation
from robovlms.policy import CheckpointPolicy
from robovlms.training import FormulationModule, load_config

BACKBONES = ["gpt-scratch", "kosmos2", "paligemma", "flamingo", "film-convnet"]
HISTORY = {"one-step-discrete": 1, "one-step-continuous": 1, "interleaved": 3, "policy-head": 3}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("synthetic") / "store")


def make_formulation(store, name, backbone="gpt-scratch", history=None, chunk=2, **options):
    torch.manual_seed(0)
    return create_formulation(name, create_backbone(backbone), store.action_statistics, store.state_statistics,
                              history=history or HISTORY[name], chunk=chunk, use_state=True, **options)


def test_the_four_formulations_are_registered():
    assert set(HISTORY) <= set(FORMULATIONS.names())


@pytest.mark.parametrize("bins", [7, 256, 1024])
def test_discretise_then_undiscretise_error_is_at_most_half_a_bin(bins):
    discretiser = ActionDiscretiser(bins)
    values = torch.cat([torch.linspace(-1, 1, 10_001), torch.rand(10_000) * 2 - 1])
    error = (discretiser.undiscretise(discretiser.discretise(values)) - values).abs()
    assert error.max() <= 1 / bins + 1e-6


def test_actions_are_clipped_to_the_percentiles_and_scaled_to_unit_range():
    statistics = Statistics(p01=[-2.0, 0.0, -1.0], p99=[2.0, 1.0, 1.0], mean=[0] * 3, std=[1] * 3, min=[-5] * 3,
                            max=[5] * 3)
    normaliser = ActionNormaliser(statistics)
    arm, gripper = normaliser.normalise(torch.tensor([[-2.0, 1.0, -0.3], [5.0, 0.25, 0.7], [0.0, -3.0, 1.0]]))
    torch.testing.assert_close(arm, torch.tensor([[-1.0, 1.0], [1.0, -0.5], [0.0, -1.0]]))
    assert gripper.tolist() == [0.0, 1.0, 1.0]
    restored = normaliser.unnormalise(arm, gripper)
    torch.testing.assert_close(restored, torch.tensor([[-2.0, 1.0, -1.0], [2.0, 0.25, 1.0], [0.0, 0.0, 1.0]]))


def test_an_unknown_formulation_lists_the_valid_ones(store):
    with pytest.raises(UnknownNameError, match="one-step-discrete.*policy-head"):
        make_formulation(store, "one-step", history=1)


def test_an_unknown_formulation_option_lists_the_valid_ones(store):
    with pytest.raises(ConfigError, match="unknown option.*headd.*valid options: .*head"):
        make_formulation(store, "policy-head", headd="lstm")
    with pytest.raises(UnknownNameError, match="policy head 'rnn'; valid choices: gpt, lstm, mlp"):
        make_formulation(store, "policy-head", head="rnn")


@pytest.mark.parametrize("name", ["one-step-discrete", "one-step-continuous"])
def test_one_step_formulations_refuse_a_history(store, name):
    with pytest.raises(ConfigError, match="history must be 1"):
        make_formulation(store, name, history=4)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", list(HISTORY))
def test_every_formulation_learns_on_every_backbone(store, name, backbone):
    formulation = make_formulation(store, name, backbone)
    losses, metrics = train_briefly(formulation, store)
    assert losses[-1] < 0.8 * losses[0], losses
    assert {"arm_error", "gripper_accuracy"} <= set(metrics)


def observation(batch, index, frame):
    return Observation(images={"rgb_static": batch["images"][index, frame, 0].numpy()},
                       state=batch["state"][index, frame].numpy(), instruction=batch["instruction"][index])


def episode_windows(store, formulation, episode=1, frame_stride=1):
    dataset = WindowDataset(store, formulation.history, formulation.chunk, episodes=[episode],
                            frame_stride=frame_stride)
    return dataset.__getitems__(list(range(len(dataset))))


@pytest.mark.parametrize("name", list(HISTORY))
def test_rollout_policy_steps_equal_the_batched_forward_on_the_same_window(store, name):
    """Executing whole chunks, the policy observes every L-th frame: its history matches windows of stride L."""
    formulation = make_formulation(store, name).eval()
    stride = formulation.chunk
    windows = episode_windows(store, formulation, frame_stride=stride)
    batched = formulation.act(windows["images"], windows["state"], windows["instruction"])  # (T, L, A)
    policy = CheckpointPolicy(formulation, ["rgb_static"], execution="chunk", frame_stride=stride)
    policy.reset(EpisodeSpec("button-press-topdown", "A", windows["instruction"][0], 0))
    for t in range(0, len(windows["instruction"]), stride):
        np.testing.assert_allclose(policy.step(observation(windows, t, -1)), batched[t].numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["interleaved", "policy-head"])
def test_a_policy_observing_every_step_keeps_history_frames_a_stride_apart(store, name):
    formulation = make_formulation(store, name).eval()
    windows = episode_windows(store, formulation, frame_stride=3)
    batched = formulation.act(windows["images"], windows["state"], windows["instruction"])  # (T, L, A)
    policy = CheckpointPolicy(formulation, ["rgb_static"], execution="first", frame_stride=3)
    policy.reset(EpisodeSpec("button-press-topdown", "A", windows["instruction"][0], 0))
    for t in range(len(windows["instruction"])):
        np.testing.assert_allclose(policy.step(observation(windows, t, -1)), batched[t, 0].numpy(), atol=1e-5)


def test_history_frames_that_chunk_execution_cannot_observe_are_refused(store):
    formulation = make_formulation(store, "policy-head").eval()
    with pytest.raises(ConfigError, match="frame_stride"):
        CheckpointPolicy(formulation, ["rgb_static"], execution="chunk", frame_stride=1)


@pytest.mark.parametrize("head", ["lstm", "gpt", "mlp"])
def test_policy_head_cache_gives_the_actions_of_recomputing_with_one_backbone_pass_per_step(store, head):
    formulation = make_formulation(store, "policy-head", history=5, head=head).eval()
    windows = episode_windows(store, formulation, frame_stride=formulation.chunk)
    calls = []
    formulation.backbone.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[1]))
    policy = CheckpointPolicy(formulation, ["rgb_static"], execution="chunk", frame_stride=formulation.chunk)
    policy.reset(EpisodeSpec("button-press-topdown", "A", windows["instruction"][0], 0))
    for t in range(0, len(windows["instruction"]), formulation.chunk):
        calls.clear()
        cached = policy.step(observation(windows, t, -1))
        assert calls == [1]  # one backbone pass over one frame
        recomputed = formulation.act(windows["images"][t:t + 1], windows["state"][t:t + 1],
                                     windows["instruction"][t:t + 1])[0]
        np.testing.assert_allclose(cached, recomputed.numpy(), atol=1e-5)


class ConstantChunks:
    """A stand-in formulation whose chunk predicted at step k gives step s the arm action s + k."""

    def __init__(self, chunk):
        self.history, self.chunk, self.steps = 1, chunk, 0
        self.actions = ActionNormaliser(Statistics(p01=[-100.0, 0.0], p99=[100.0, 0.0], mean=[0.0] * 2,
                                                   std=[1.0] * 2, min=[0.0] * 2, max=[0.0] * 2))

    def eval(self):
        return self

    def encode(self, images, state, instructions):
        return {"state": state}

    def predict(self, encoded, instructions, generator=None):
        arm = (2 * self.steps + torch.arange(self.chunk, dtype=torch.float32)) / 100
        self.steps += 1
        return torch.stack([arm, torch.ones(self.chunk)], dim=-1)[None]


def test_temporal_ensemble_averages_every_chunk_covering_a_step_oldest_weighted_most():
    policy = CheckpointPolicy(ConstantChunks(chunk=3), ["rgb_static"], execution="ensemble", ensemble_decay=0.5)
    policy.reset(EpisodeSpec("t", "A", "do it", 0))
    frame = Observation(images={"rgb_static": np.zeros((8, 8, 3), np.uint8)}, state=np.zeros(1), instruction="do it")
    actions = [policy.step(frame) for _ in range(4)]
    for s, action in enumerate(actions):
        covering = np.arange(max(0, s - 2), s + 1)  # the steps whose chunks of 3 reach step s, oldest first
        weights = np.exp(-0.5 * np.arange(len(covering)))
        assert action[0] == pytest.approx(((s + covering) * weights).sum() / weights.sum(), abs=1e-4)
    assert all(a[1] == 1.0 for a in actions)


# ---- one-step-discrete decodings ------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_parallel_decoding_in_one_pass_gives_the_tokens_of_decoding_position_by_position(store, backbone):
    """The action queries see the observation and the queries before them only: the one-pass logits equal those of
    a plain loop that decodes position i from the first i + 1 queries."""
    formulation = make_formulation(store, "one-step-discrete", backbone).eval()
    windows = episode_windows(store, formulation)
    encoded = formulation.encode(windows["images"][:3], windows["state"][:3], windows["instruction"][:3])
    with torch.no_grad():
        one_pass = formulation(encoded, windows["instruction"][:3])[:, 0]  # (B, L * A, bins) of the one frame
        start = formulation.lrn_embeds(encoded)[:, -1:]
        for i in range(formulation.tokens_per_step):
            suffix = start + formulation.queries[:i + 1]
            hidden = formulation.backbone(encoded["pixel_values"][:, -1:], windows["instruction"][:3], suffix)
            logits = formulation.backbone.lm_logits(hidden[:, 0, -1])[..., formulation.action_token_ids]
            torch.testing.assert_close(one_pass[:, i], logits, atol=1e-4, rtol=1e-4)
            assert torch.equal(one_pass[:, i].argmax(-1), logits.argmax(-1))


def test_parallel_decoding_takes_one_backbone_pass_per_step_and_autoregressive_one_per_token(store):
    for decoding in ("parallel", "autoregressive"):
        formulation = make_formulation(store, "one-step-discrete", decoding=decoding).eval()
        passes = 1 if decoding == "parallel" else formulation.chunk * formulation.action_dim
        windows = episode_windows(store, formulation)
        calls = []
        formulation.backbone.register_forward_hook(lambda module, args, output: calls.append(1))
        formulation.act(windows["images"][:1], windows["state"][:1], windows["instruction"][:1])
        assert len(calls) == passes, decoding


def test_the_first_action_token_accuracy_is_logged_on_its_own(store):
    formulation = make_formulation(store, "one-step-discrete")
    batch = WindowDataset(store, 1, formulation.chunk).__getitems__(list(range(0, 48, 6)))
    _, metrics = formulation.loss(batch)
    assert {"token_accuracy", "first_token_accuracy", "first_action_accuracy"} <= set(metrics)
    assert 0 <= metrics["first_token_accuracy"] <= 1


def test_overwriting_a_large_share_of_a_small_vocabulary_with_action_tokens_is_refused(store):
    with pytest.raises(ConfigError, match="token_mode overwrite would turn 256 of the .* ordinary tokens"):
        make_formulation(store, "one-step-discrete", token_mode="overwrite")
    plain = make_formulation(store, "one-step-discrete", token_mode="overwrite", bins=32, decoding="autoregressive")
    assert plain.action_token_ids.max() < plain.backbone.tokenizer.vocab_size  # RT-2/OpenVLA's scheme stays


def test_an_unknown_decoding_lists_the_valid_ones(store):
    with pytest.raises(UnknownNameError, match="decoding 'beam'; valid choices: autoregressive, parallel"):
        make_formulation(store, "one-step-discrete", decoding="beam")


def test_the_mlp_action_head_reads_every_token_from_the_lrn_state_in_one_pass(store):
    formulation = make_formulation(store, "one-step-discrete", action_head="mlp").eval()
    windows = episode_windows(store, formulation)
    suffix_lengths = []
    formulation.backbone.register_forward_hook(lambda module, args, output: suffix_lengths.append(args[2].shape[2]))
    encoded = formulation.encode(windows["images"][:2], windows["state"][:2], windows["instruction"][:2])
    logits = formulation(encoded, windows["instruction"][:2])
    assert logits.shape == (2, 1, formulation.chunk * formulation.action_dim, formulation.config.bins)
    assert suffix_lengths == [1]  # the [LRN] token alone


def test_the_mlp_action_head_learns_and_needs_parallel_decoding(store):
    formulation = make_formulation(store, "one-step-discrete", action_head="mlp")
    losses, _ = train_briefly(formulation, store)
    assert losses[-1] < 0.8 * losses[0]
    with pytest.raises(ConfigError, match="use decoding parallel"):
        make_formulation(store, "one-step-discrete", action_head="mlp", decoding="autoregressive")
    with pytest.raises(UnknownNameError, match="action head 'lstm'; valid choices: lm, mlp"):
        make_formulation(store, "one-step-discrete", action_head="lstm")


def test_interleaved_can_state_the_instruction_per_frame_as_robovlms_does(store):
    once = make_formulation(store, "interleaved").eval()
    per_frame = make_formulation(store, "interleaved", instruction="per-frame").eval()
    per_frame.load_state_dict(once.state_dict())
    windows = episode_windows(store, once)
    args = (windows["images"][:2], windows["state"][:2], windows["instruction"][:2])
    assert not torch.allclose(once.act(*args), per_frame.act(*args))  # the same weights read another context
    with pytest.raises(UnknownNameError, match="instruction placement 'twice'; valid choices: once, per-frame"):
        make_formulation(store, "interleaved", instruction="twice")


STATE_TOKEN_CASES = [("one-step-continuous", {}), ("interleaved", {}), ("policy-head", {}),
                     ("one-step-discrete", {}), ("one-step-discrete", {"decoding": "autoregressive"}),
                     ("one-step-discrete", {"action_head": "mlp"})]


@pytest.mark.parametrize("backbone", [*BACKBONES, "llava"])
@pytest.mark.parametrize("name, options", STATE_TOKEN_CASES)
def test_the_state_token_comes_just_before_each_lrn_and_the_prediction_is_read_at_the_lrn(store, name, options,
                                                                                          backbone):
    if backbone == "llava":
        pytest.importorskip("robovlms_llava", reason="example plugin: pip install -e examples/robovlms-llava-plugin")
    formulation = make_formulation(store, name, backbone, state_input="token", **options)
    windows = episode_windows(store, formulation)
    batch = {key: value[:2] for key, value in windows.items()}
    contexts = []
    contextualise = formulation.backbone.forward

    def spoil_the_state_token_position(pixel_values, instructions, suffix_embeds, *args, **kwargs):
        contexts.append(suffix_embeds)
        hidden = contextualise(pixel_values, instructions, suffix_embeds, *args, **kwargs).clone()
        hidden[:, :, 0] = float("nan")  # whatever reads the state token's hidden state turns to NaN
        return hidden

    formulation.backbone.forward = spoil_the_state_token_position
    loss, _ = formulation.loss(batch)
    assert torch.isfinite(loss)
    state = formulation.state_embedding(formulation.state.normalise(batch["state"].float()))  # (B, T, D)
    frames = contexts[0].shape[1]
    torch.testing.assert_close(contexts[0][:, :, 0], state[:, -frames:])
    lrn = contexts[0][:, :, 1] - (formulation.queries[0] if hasattr(formulation, "queries") else 0)
    torch.testing.assert_close(lrn, formulation.lrn.expand_as(lrn))


@pytest.mark.parametrize("name", list(HISTORY))
def test_every_formulation_learns_with_a_state_token(store, name):
    formulation = make_formulation(store, name, state_input="token")
    losses, _ = train_briefly(formulation, store, steps=30)
    assert losses[-1] < 0.8 * losses[0], losses
    assert formulation.state_embedding.weight.grad.abs().sum() > 0


def test_the_state_token_and_the_added_state_read_the_same_weights_differently(store):
    added = make_formulation(store, "one-step-continuous").eval()
    token = make_formulation(store, "one-step-continuous", state_input="token").eval()
    token.load_state_dict(added.state_dict())  # the same parameters: only where the state goes differs
    windows = episode_windows(store, added)
    args = (windows["images"][:2], windows["state"][:2], windows["instruction"][:2])
    assert not torch.allclose(added.act(*args), token.act(*args))
    moved = (args[0], args[1] + 1.0, args[2])
    assert not torch.allclose(token.act(*args), token.act(*moved))  # the state reaches the prediction


def test_an_unknown_state_input_lists_the_valid_ones(store):
    with pytest.raises(UnknownNameError, match="state input 'concat'; valid choices: add, token"):
        make_formulation(store, "one-step-continuous", state_input="concat")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_discrete_action_tokens_train_while_the_other_word_embeddings_and_the_vision_tower_stay_frozen(store,
                                                                                                     backbone):
    # autoregressive: the decoded tokens' embeddings are inputs, so their rows get a gradient even when untied
    formulation = make_formulation(store, "one-step-discrete", backbone, bins=16, decoding="autoregressive")
    formulation.backbone.freeze("frozen-vision-and-embeddings")
    module = FormulationModule(formulation, load_config({"store": "-", "run_dir": "-", "weight_decay": 0.5}))
    optimiser = module.configure_optimizers()["optimizer"]
    embedding = formulation.backbone.input_embeddings().weight
    vision = [p for m in formulation.backbone.vision_modules() for p in m.parameters()]
    before, vision_before = embedding.detach().clone(), [p.detach().clone() for p in vision]
    batch = WindowDataset(store, 1, formulation.chunk).__getitems__(list(range(0, 48, 6)))
    for _ in range(3):
        optimiser.zero_grad()
        formulation.loss(batch)[0].backward()
        optimiser.step()
    changed = set((embedding.detach() != before).any(-1).nonzero().flatten().tolist())
    assert changed and changed <= set(formulation.action_token_ids.tolist())  # no weight decay on frozen rows
    assert all(torch.equal(p, q) for p, q in zip(vision, vision_before))


# ---- RoboVLMs' definitions as options ----------------------------------------------------------------------------

def four_dimensional_statistics():
    return Statistics(p01=[-2.0, 0.0, -0.1, -1.0], p99=[2.0, 1.0, 0.1, 1.0], mean=[0] * 4, std=[1] * 4, min=[-5] * 4,
                      max=[5] * 4)


def test_clip_normalisation_maps_the_fixed_bounds_to_unit_range_and_clips_beyond_them():
    """RoboVLMs' `normalize_action`: every arm dimension clipped to [-0.65, 0.65], then scaled to [-1, 1], whatever
    the store's percentiles; the gripper stays a binary."""
    normaliser = ActionNormaliser(four_dimensional_statistics(), "clip", 0.65)
    raw = torch.tensor([[0.65, -0.65, 0.325, 1.0], [2.0, -1.0, 0.0, -1.0]])
    arm, gripper = normaliser.normalise(raw)
    torch.testing.assert_close(arm, torch.tensor([[1.0, -1.0, 0.5], [1.0, -1.0, 0.0]]))
    assert gripper.tolist() == [1.0, 0.0]
    torch.testing.assert_close(normaliser.unnormalise(arm, gripper),
                               torch.tensor([[0.65, -0.65, 0.325, 1.0], [0.65, -0.65, 0.0, -1.0]]))


def test_percentile_and_clip_normalisation_differ_on_the_same_actions(store):
    raw = torch.tensor([[0.5, 0.5, 0.05, 1.0]])
    clipped, _ = ActionNormaliser(four_dimensional_statistics(), "clip").normalise(raw)
    by_percentiles, _ = ActionNormaliser(four_dimensional_statistics()).normalise(raw)
    torch.testing.assert_close(clipped, torch.tensor([[0.5 / 0.65, 0.5 / 0.65, 0.05 / 0.65]]))
    torch.testing.assert_close(by_percentiles, torch.tensor([[0.25, 0.0, 0.5]]))


@pytest.mark.parametrize("name", list(HISTORY))
def test_every_formulation_normalises_actions_as_its_action_normalisation_option_says(store, name):
    formulation = make_formulation(store, name, action_normalisation="clip", action_clip=0.5)
    raw = torch.tensor([[0.25, -0.5, 9.0, 1.0]])
    torch.testing.assert_close(formulation.actions.normalise(raw)[0], torch.tensor([[0.5, -1.0, 1.0]]))


def test_a_bad_action_normalisation_is_refused_naming_the_valid_ones(store):
    with pytest.raises(UnknownNameError, match="action normalisation 'minmax'; valid choices: clip, percentiles"):
        make_formulation(store, "one-step-continuous", action_normalisation="minmax")
    with pytest.raises(ConfigError, match="action_clip 0.5 bounds action_normalisation clip"):
        make_formulation(store, "one-step-continuous", action_clip=0.5)
    with pytest.raises(ConfigError, match="action_clip must be a positive number, got -1"):
        make_formulation(store, "one-step-continuous", action_normalisation="clip", action_clip=-1.0)


@pytest.mark.parametrize("name", list(HISTORY))
def test_the_lrn_token_starts_at_zeros_with_lrn_init_zeros_and_random_by_default(store, name):
    assert torch.count_nonzero(make_formulation(store, name, lrn_init="zeros").lrn) == 0
    assert make_formulation(store, name).lrn.std() > 0
    with pytest.raises(UnknownNameError, match=r"\[LRN\] init 'ones'; valid choices: random, zeros"):
        make_formulation(store, name, lrn_init="ones")


def test_an_option_of_the_wrong_type_is_refused_naming_it_and_the_value(store):
    with pytest.raises(ConfigError, match=r"option with_history: .*\(got 'sometimes'\)"):
        make_formulation(store, "one-step-discrete", with_history="sometimes")


def test_255_bins_have_the_bin_centres_and_bins_of_robovlms_action_tokenizer():
    """RoboVLMs' ActionTokenizer: 256 edges over [-1, 1], `np.digitize`, bin centres between edges, the top index
    folded onto the last centre; 255 uniform bins here give the same centre for every value."""
    edges = np.linspace(-1, 1, 256)
    centres = (edges[:-1] + edges[1:]) / 2
    values = np.concatenate([np.linspace(-1, 1, 2001), np.random.default_rng(0).uniform(-1, 1, 2000)])
    theirs = centres[np.clip(np.digitize(values, edges) - 1, 0, 254)]
    discretiser = ActionDiscretiser(255)
    ours = discretiser.undiscretise(discretiser.discretise(torch.tensor(values))).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def hand_made_logits(formulation, row):
    """Make the language model's head give `row` (V,) at every position."""
    formulation.backbone.lm_logits = lambda hidden: row.to(hidden.dtype).expand(*hidden.shape[:-1], -1)


def test_full_vocabulary_cross_entropy_differs_from_the_action_token_softmax_on_a_hand_made_logit_row(store):
    batch = WindowDataset(store, 1, 2).__getitems__([0, 5])
    losses = {}
    for vocabulary in ("action-tokens", "full"):
        formulation = make_formulation(store, "one-step-discrete", bins=4, vocabulary=vocabulary)
        ids = formulation.action_token_ids
        row = torch.zeros(formulation.backbone.input_embeddings().num_embeddings)
        row[:8] = 3.0  # ordinary tokens the full softmax also normalises over
        row[ids] = torch.tensor([0.0, 1.0, 2.0, 0.5])
        hand_made_logits(formulation, row)
        targets = formulation.tokens(batch["actions"][:, -1])  # (B, L * A) bins
        mask = batch["action_mask"][:, -1].repeat_interleave(formulation.action_dim, dim=1)
        over = row if vocabulary == "full" else row[ids]
        classes = ids[targets] if vocabulary == "full" else targets
        expected = -over.log_softmax(-1)[classes][mask].mean()
        losses[vocabulary], _ = formulation.loss(batch)
        torch.testing.assert_close(losses[vocabulary], expected)
    assert losses["full"] > losses["action-tokens"] + 1  # the ordinary tokens take probability mass


def test_full_vocabulary_logs_how_often_the_argmax_is_not_an_action_token(store):
    formulation = make_formulation(store, "one-step-discrete", bins=4, vocabulary="full")
    row = torch.zeros(formulation.backbone.input_embeddings().num_embeddings)
    row[0] = 5.0
    hand_made_logits(formulation, row)
    _, metrics = formulation.loss(WindowDataset(store, 1, 2).__getitems__([0, 5]))
    assert metrics["non_action_argmax"] == 1.0


@pytest.mark.parametrize("decoding", ["parallel", "autoregressive"])
def test_rollout_actions_first_decodes_only_the_first_action(store, decoding):
    formulation = make_formulation(store, "one-step-discrete", chunk=3, decoding=decoding,
                                   rollout_actions="first").eval()
    windows = episode_windows(store, formulation)
    calls = []
    formulation.backbone.register_forward_hook(lambda module, args, output: calls.append(1))
    actions = formulation.act(windows["images"][:2], windows["state"][:2], windows["instruction"][:2])
    assert actions.shape == (2, 1, formulation.action_dim)
    assert len(calls) == (1 if decoding == "parallel" else formulation.action_dim)
    chunk = make_formulation(store, "one-step-discrete", chunk=3, decoding=decoding).eval()
    torch.testing.assert_close(actions, chunk.act(windows["images"][:2], windows["state"][:2],
                                                  windows["instruction"][:2])[:, :1])


def test_one_step_discrete_takes_a_history_only_with_with_history(store):
    with pytest.raises(ConfigError, match="history must be 1, not 3; .*with_history: true"):
        make_formulation(store, "one-step-discrete", history=3)
    with pytest.raises(ConfigError, match="with_history and decoding autoregressive.*overlap"):
        make_formulation(store, "one-step-discrete", history=3, with_history=True, decoding="autoregressive")


def test_with_history_puts_the_frames_in_one_causal_context_each_predicting_its_own_tokens(store):
    formulation = make_formulation(store, "one-step-discrete", history=3, with_history=True).eval()
    windows = episode_windows(store, formulation)
    layouts = []
    formulation.backbone.register_forward_hook(lambda module, args, kwargs, output: layouts.append(kwargs),
                                               with_kwargs=True)
    encoded = formulation.encode(windows["images"][:2], windows["state"][:2], windows["instruction"][:2])
    with torch.no_grad():
        logits = formulation(encoded, windows["instruction"][:2])
        changed = {**encoded, "pixel_values": encoded["pixel_values"].clone()}
        changed["pixel_values"][:, -1] = 0  # the last frame's images
        after = formulation(changed, windows["instruction"][:2])
    assert layouts[0] == {"interleaved": True, "instruction_per_frame": True}
    assert logits.shape == (2, 3, formulation.tokens_per_step, formulation.config.bins)
    torch.testing.assert_close(after[:, :2], logits[:, :2])  # causal: earlier frames do not see later ones
    assert not torch.allclose(after[:, 2], logits[:, 2])


def test_with_history_learns_every_frame_and_the_rollout_policy_matches_the_batched_forward(store):
    formulation = make_formulation(store, "one-step-discrete", history=3, with_history=True)
    losses, _ = train_briefly(formulation, store)
    assert losses[-1] < 0.8 * losses[0], losses
    formulation.eval()
    windows = episode_windows(store, formulation)
    batched = formulation.act(windows["images"], windows["state"], windows["instruction"])
    policy = CheckpointPolicy(formulation, ["rgb_static"], execution="first")
    policy.reset(EpisodeSpec("button-press-topdown", "A", windows["instruction"][0], 0))
    for t in range(len(windows["instruction"])):
        np.testing.assert_allclose(policy.step(observation(windows, t, -1)), batched[t, 0].numpy(), atol=1e-5)


def test_robovlms_token_placement_skips_the_special_token_count_plus_ten_ids(store):
    """RoboVLMs' action tokens count down from vocab_size - (special tokens) - 10 (action_tokenizer.py:49-63)."""
    last = make_formulation(store, "one-step-discrete", "kosmos2", bins=32, token_mode="overwrite")
    placed = make_formulation(store, "one-step-discrete", "kosmos2", bins=32, token_mode="overwrite",
                              token_placement="robovlms")
    tokenizer = placed.backbone.tokenizer
    first = tokenizer.vocab_size - len(tokenizer.special_tokens_map) - 10 - 1
    assert placed.action_token_ids.tolist() == list(range(first, first - 32, -1))
    assert last.action_token_ids[0] > placed.action_token_ids[0]
    with pytest.raises(UnknownNameError, match="token placement 'first'; valid choices: last, robovlms"):
        make_formulation(store, "one-step-discrete", token_placement="first")


def test_the_policy_head_lstm_is_as_wide_and_deep_as_its_fusion_options(store):
    """RoboVLMs' LSTMDecoder: 1024 wide, 4 layers (`fusion_width`, `fusion_layers`; small here)."""
    lstm = make_formulation(store, "policy-head", fusion_width=48, fusion_layers=3).fusion.lstm
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers) == (64, 48, 3)

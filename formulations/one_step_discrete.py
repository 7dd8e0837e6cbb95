"""one-step-discrete (RT-2, OpenVLA, OpenVLA-OFT): every normalised action dimension of the next L actions is
discretised into bins mapped onto reserved vocabulary tokens, the gripper being one more token (its bin at -1 or
+1). Cross-entropy over the action tokens in training; at rollout, the argmax over the action tokens.

Two decodings of the L x A tokens after the current observation, the instruction and, with `state_input: token`,
the state token:

    parallel (OpenVLA-OFT): the suffix holds L x A action queries, each the [LRN] embedding (carrying the proprio
        state if added to it) plus a learned query of its position; the hidden state at query i predicts token i. One
        backbone pass per step, and no token is predicted from the previous ones, so every token must be read
        from the observation.
    autoregressive (RT-2, OpenVLA): the suffix holds the [LRN] start token, then the embeddings of the tokens
        decoded so far; the hidden state at position i predicts token i + 1 (teacher forcing in training). One
        backbone pass per token at rollout.

The logits over the bins come from the language model's head restricted to the action tokens (`action_head: lm`,
as RT-2 and OpenVLA), or from an MLP on the [LRN] state (`action_head: mlp`: a classification head beside the
continuous formulations' regression head, the same action space through a head that does not go through the
vocabulary). With tiny random-init backbones the LM head memorises the training episodes; see
docs/formulations.md for the measurements.

RoboVLMs' variant (`recipe: robovlms` sets it): autoregressive decoding with the cross-entropy over the whole
vocabulary (`vocabulary: full`), 255 bins on ordinary tokens below the last special ones (`bins: 255, token_mode:
overwrite, token_placement: robovlms`), only the first action decoded at rollout (`rollout_actions: first`), and a
history allowed (`with_history: true`): the H frames in one causal context, each followed by its own suffix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robovlms.errors import ConfigError, UnknownNameError
from robovlms.formulation import ActionDiscretiser, Formulation, FormulationConfig, embedding_std

DECODINGS = ("parallel", "autoregressive")
READOUTS = ("argmax", "expectation")
ACTION_HEADS = ("lm", "mlp")
TOKEN_MODES = ("append", "overwrite")
TOKEN_PLACEMENTS = ("last", "robovlms")
VOCABULARIES = ("action-tokens", "full")
ROLLOUT_ACTIONS = ("chunk", "first")
# Overwriting more than this share of a vocabulary's ordinary tokens turns most instruction words into action
# tokens (a tiny 512-token vocabulary with 256 bins: 126 of the demo's 158 instruction tokens), and the tied
# embeddings then mean one thing in the instruction and another in the action.
MAX_OVERWRITTEN_SHARE = 0.1


@dataclass
class OneStepDiscreteConfig(FormulationConfig):
    bins: int = 256  # uniform over [-1, 1] per dimension (RoboVLMs: 255, between 256 edges)
    token_mode: str = "append"  # new tokens, or `overwrite` the last ordinary ones (RT-2/OpenVLA on a 32k vocabulary)
    # which ordinary ids `overwrite` takes: the last ones (last), or those below RoboVLMs' offset of (special tokens
    # + 10) (robovlms); appended tokens have no placement
    token_placement: str = "last"
    decoding: str = "parallel"  # parallel (OpenVLA-OFT) | autoregressive (RT-2, OpenVLA)
    # the cross-entropy's softmax: over the action tokens, or over the whole vocabulary (RoboVLMs)
    vocabulary: str = "action-tokens"
    rollout_actions: str = "chunk"  # decode the chunk's L actions at rollout, or only the first (RoboVLMs)
    with_history: bool = False  # H frames in one causal context, each with its suffix (RoboVLMs); else history 1
    label_sigma: float = 0.0  # > 0: ordinal soft targets, a Gaussian over neighbouring bins (in bins)
    readout: str = "argmax"  # argmax bin, or the expectation of the bin centres under the predicted distribution
    action_head: str = "lm"  # lm: the language model's head over action tokens; mlp: an MLP from the [LRN] state
    head_width: int = 256  # the mlp action head's hidden width


def robovlms_token_skip(tokenizer) -> int:
    """How many ordinary ids at the end of the base vocabulary RoboVLMs' ActionTokenizer leaves before its first
    action token: its tokens count down from vocab_size - (special tokens) - 10 (action_tokenizer.py:42-63)."""
    special = sum(len(tokens) if isinstance(tokens, list) else 1 for tokens in tokenizer.special_tokens_map.values())
    first_excluded = tokenizer.vocab_size - special - 10
    skipped = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    return sum(1 for token_id in range(max(first_excluded, 0), tokenizer.vocab_size) if token_id not in skipped)


class OneStepDiscrete(Formulation):
    name = "one-step-discrete"
    description = "current observation -> action tokens (bins per dimension), decoded in parallel or one by one"
    single_frame = True
    history_advice = ("use interleaved or policy-head for a history, or with_history: true (RoboVLMs: the frames in "
                      "one causal context)")
    batched_rollouts = True  # decoding draws no noise; each row's tokens depend on that row alone
    config_class = OneStepDiscreteConfig

    @classmethod
    def takes_history(cls, config) -> bool:
        return config.with_history

    @classmethod
    def check_settings(cls, history, chunk, options):
        config = super().check_settings(history, chunk, options)
        for name, valid in (("decoding", DECODINGS), ("action_head", ACTION_HEADS), ("readout", READOUTS),
                            ("token_mode", TOKEN_MODES), ("token_placement", TOKEN_PLACEMENTS),
                            ("vocabulary", VOCABULARIES), ("rollout_actions", ROLLOUT_ACTIONS)):
            if getattr(config, name) not in valid:
                raise UnknownNameError(name.replace("_", " "), getattr(config, name), valid)
        if config.action_head == "mlp" and config.decoding != "parallel":
            raise ConfigError("action_head mlp predicts every token from the [LRN] state at once: use decoding parallel")
        if config.action_head == "mlp" and config.vocabulary != "action-tokens":
            raise ConfigError("vocabulary full is the softmax of the language model's head; action_head mlp has only "
                              "the bins: use action_head lm")
        if config.vocabulary == "full" and (config.label_sigma > 0 or config.readout != "argmax"):
            raise ConfigError("vocabulary full trains one-hot over the whole vocabulary and decodes by argmax "
                              "(RoboVLMs); label_sigma and readout expectation spread over the bins: use vocabulary "
                              "action-tokens for them")
        if config.label_sigma < 0:
            raise ConfigError(f"label_sigma must be at least 0, got {config.label_sigma}")
        if history > 1 and config.decoding == "autoregressive":
            raise ConfigError(f"with_history and decoding autoregressive: the earlier frames' suffixes would hold their "
                              f"teacher-forced action tokens, whose chunks overlap the next frames' targets (RoboVLMs "
                              f"trains so and decodes without them), and a rollout has no such tokens; use history 1 "
                              f"or decoding parallel, got history {history}")
        return config

    def __init__(self, backbone, action_statistics, state_statistics, **settings):
        super().__init__(backbone, action_statistics, state_statistics, **settings)
        self.discretiser = ActionDiscretiser(self.config.bins)
        self.tokens_per_step = self.chunk * self.action_dim
        # history > 1 (with_history): every frame and its suffix in one causal context, its instruction before it
        self.layout = {"interleaved": True, "instruction_per_frame": True} if self.history > 1 else {}
        if self.config.action_head == "mlp":
            D, width = backbone.hidden_size, self.config.head_width
            self.head = nn.Sequential(nn.Linear(D, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                      nn.Linear(width, self.tokens_per_step * self.config.bins))
            return
        ordinary = backbone.tokenizer.vocab_size
        if self.config.token_mode == "overwrite" and self.config.bins > MAX_OVERWRITTEN_SHARE * ordinary:
            raise ConfigError(f"token_mode overwrite would turn {self.config.bins} of the {ordinary} ordinary tokens "
                              f"of {backbone.label} into action tokens (more than {MAX_OVERWRITTEN_SHARE:.0%}), so "
                              f"instruction words would share embeddings with action bins; use token_mode: append "
                              f"or fewer bins")
        skip = robovlms_token_skip(backbone.tokenizer) if self.config.token_placement == "robovlms" else 0
        self.register_buffer("action_token_ids", backbone.reserve_action_tokens(self.config.bins,
                                                                                self.config.token_mode, skip=skip))
        if self.config.decoding == "parallel":
            self.queries = nn.Parameter(torch.randn(self.tokens_per_step, backbone.hidden_size) * embedding_std(backbone))

    def tokens(self, actions: torch.Tensor) -> torch.Tensor:
        """Raw actions (..., L, A) -> bin indices (..., L * A), dimension by dimension, action by action."""
        arm, gripper = self.actions.normalise(actions)
        values = torch.cat([arm, (2 * gripper - 1).unsqueeze(-1)], dim=-1)
        return self.discretiser.discretise(values).flatten(-2)

    def forward(self, encoded: dict[str, torch.Tensor], instructions: list[str], bins: torch.Tensor | None = None,
                vocabulary: bool = False) -> torch.Tensor:
        """Logits of every frame's tokens (B, T, n, bins), or with `vocabulary` over the whole vocabulary
        (B, T, n, V); T is 1, or H with with_history. parallel: n = L * A. autoregressive (T = 1): bins (B, n) of
        the tokens decoded so far -> the logits of the next ones, n + 1."""
        frames = self.history
        pixel_values = encoded["pixel_values"][:, -frames:]
        prefix = self.lrn_embeds(encoded)[:, -frames:]  # (B, T, K, D): [the state token,] the [LRN] start token
        state, start = prefix[:, :, :-1], prefix[:, :, -1:]
        if self.config.action_head == "mlp":
            hidden = self.backbone(pixel_values, instructions, prefix, **self.layout)[:, :, -1]  # (B, T, D)
            return self.head(hidden.to(self.weight_dtype)).unflatten(-1, (self.tokens_per_step, self.config.bins))
        if self.config.decoding == "parallel":
            suffix = start + self.queries.to(start.dtype)  # (B, T, L * A, D)
        else:
            previous = self.backbone.embed_tokens(self.action_token_ids[bins]).unsqueeze(1)  # (B, 1, n, D)
            suffix = torch.cat([start, previous.to(start.dtype)], dim=2)
        hidden = self.backbone(pixel_values, instructions, torch.cat([state, suffix], dim=2), **self.layout)
        logits = self.backbone.lm_logits(hidden[:, :, state.shape[2]:])  # (B, T, n, V)
        return logits if vocabulary else logits[..., self.action_token_ids]

    def predict(self, encoded, instructions, generator=None):
        B = encoded["pixel_values"].shape[0]
        actions = 1 if self.config.rollout_actions == "first" else self.chunk
        if self.config.decoding == "parallel":
            logits = self(encoded, instructions)[:, -1, :actions * self.action_dim]  # (B, n, bins)
        else:
            bins = torch.zeros(B, 0, dtype=torch.long, device=self.lrn.device)
            steps = []
            for _ in range(actions * self.action_dim):
                steps.append(self(encoded, instructions, bins)[:, -1, -1])
                bins = torch.cat([bins, steps[-1].argmax(-1, keepdim=True)], dim=1)
            logits = torch.stack(steps, dim=1)
        if self.config.readout == "expectation":
            centres = self.discretiser.undiscretise(torch.arange(self.config.bins, device=logits.device))
            values = logits.float().softmax(-1) @ centres
        else:
            # argmax over the action tokens; with vocabulary full, the argmax over the whole vocabulary when that is an
            # action token, and otherwise the likeliest action token
            values = self.discretiser.undiscretise(logits.argmax(-1))
        values = values.view(B, actions, self.action_dim)
        return torch.cat([values[..., :-1], (values[..., -1:] > 0).float()], dim=-1)

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (...) of logits (..., C) against target classes (...), one-hot or, with label_sigma,
        spread over the neighbouring bins so that a near miss costs less than a far one."""
        if self.config.label_sigma == 0:
            return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)
        distance = torch.arange(self.config.bins, device=targets.device) - targets.unsqueeze(-1)  # (..., bins)
        soft = torch.softmax(-0.5 * (distance / self.config.label_sigma) ** 2, dim=-1)
        return -(soft * logits.log_softmax(-1)).sum(-1)

    def loss(self, batch: dict[str, Any], generator=None):
        frames = self.history
        encoded = self.encode(batch["images"], batch["state"], batch["instruction"])
        targets = self.tokens(batch["actions"][:, -frames:])  # (B, T, L * A)
        teacher = None if self.config.decoding == "parallel" else targets[:, -1, :-1]
        full = self.config.vocabulary == "full"
        logits = self(encoded, batch["instruction"], teacher, vocabulary=full)  # (B, T, L * A, bins or V)
        classes = self.action_token_ids[targets] if full else targets
        mask = batch["action_mask"][:, -frames:].repeat_interleave(self.action_dim, dim=-1).float()  # (B, T, L * A)
        count = mask.sum().clamp_min(1)
        loss = (self.token_loss(logits.float(), classes) * mask).sum() / count
        with torch.no_grad():
            metrics = {}
            if full:
                is_action = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                is_action[self.action_token_ids] = True
                metrics["non_action_argmax"] = (~is_action[logits.argmax(-1)] * mask).sum() / count
                logits = logits[..., self.action_token_ids]
            predicted, targets, mask = (x.flatten(0, 1) for x in (logits.argmax(-1), targets, mask))  # (B * T, n)
            correct = (predicted == targets).float()
            error = (self.discretiser.undiscretise(predicted) - self.discretiser.undiscretise(targets)).abs()
            dims = torch.arange(targets.shape[1], device=targets.device) % self.action_dim
            arm, gripper = mask * (dims < self.action_dim - 1), mask * (dims == self.action_dim - 1)
            first_action = mask[:, :self.action_dim]
            # The first token (x of the first action) is the one that can only be read from the observation;
            # under teacher forcing the later ones can be copied from the previous action's tokens.
            metrics.update({"token_accuracy": (correct * mask).sum() / count,
                            "first_token_accuracy": correct[:, 0].mean(),
                            "first_action_accuracy": (correct[:, :self.action_dim] * first_action).sum()
                            / first_action.sum().clamp_min(1),
                            "arm_error": (error * arm).sum() / arm.sum().clamp_min(1),
                            "gripper_accuracy": (correct * gripper).sum() / gripper.sum().clamp_min(1)})
        return loss, metrics

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robovlms.errors import ConfigError, UnknownNameError
from robovlms.formulation import ActionDiscretiser, Formulation, embedding_std

DECODINGS = ("parallel", "autoregressive")
READOUTS = ("argmax", "expectation")
ACTION_HEADS = ("lm", "mlp")
# Overwriting more than this share of a vocabulary's ordinary tokens turns most instruction words into action
# tokens (a tiny 512-token vocabulary with 256 bins: 126 of the demo's 158 instruction tokens), and the tied
# embeddings then mean one thing in the instruction and another in the action.
MAX_OVERWRITTEN_SHARE = 0.1


@dataclass
class OneStepDiscreteConfig:
    bins: int = 256  # uniform over [-1, 1] per dimension
    token_mode: str = "append"  # new tokens, or `overwrite` the last ordinary ones (RT-2/OpenVLA on a 32k vocabulary)
    decoding: str = "parallel"  # parallel (OpenVLA-OFT) | autoregressive (RT-2, OpenVLA)
    label_sigma: float = 0.0  # > 0: ordinal soft targets, a Gaussian over neighbouring bins (in bins)
    readout: str = "argmax"  # argmax bin, or the expectation of the bin centres under the predicted distribution
    action_head: str = "lm"  # lm: the language model's head over action tokens; mlp: an MLP from the [LRN] state
    head_width: int = 256  # the mlp action head's hidden width


class OneStepDiscrete(Formulation):
    name = "one-step-discrete"
    description = "current observation -> action tokens (bins per dimension), decoded in parallel or one by one"
    single_frame = True
    batched_rollouts = True  # decoding draws no noise; each row's tokens depend on that row alone
    config_class = OneStepDiscreteConfig

    @classmethod
    def check_settings(cls, history, chunk, options):
        config = super().check_settings(history, chunk, options)
        if config.decoding not in DECODINGS:
            raise UnknownNameError("decoding", config.decoding, DECODINGS)
        if config.action_head not in ACTION_HEADS:
            raise UnknownNameError("action head", config.action_head, ACTION_HEADS)
        if config.action_head == "mlp" and config.decoding != "parallel":
            raise ConfigError("action_head mlp predicts every token from the [LRN] state at once: use decoding parallel")
        if config.readout not in READOUTS:
            raise UnknownNameError("readout", config.readout, READOUTS)
        if config.label_sigma < 0:
            raise ConfigError(f"label_sigma must be at least 0, got {config.label_sigma}")
        return config

    def __init__(self, backbone, action_statistics, state_statistics, **settings):
        super().__init__(backbone, action_statistics, state_statistics, **settings)
        self.discretiser = ActionDiscretiser(self.config.bins)
        self.tokens_per_step = self.chunk * self.action_dim
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
        self.register_buffer("action_token_ids", backbone.reserve_action_tokens(self.config.bins,
                                                                                self.config.token_mode))
        if self.config.decoding == "parallel":
            self.queries = nn.Parameter(torch.randn(self.tokens_per_step, backbone.hidden_size) * embedding_std(backbone))

    def tokens(self, actions: torch.Tensor) -> torch.Tensor:
        """Raw actions (B, L, A) -> bin indices (B, L * A), dimension by dimension, action by action."""
        arm, gripper = self.actions.normalise(actions)
        values = torch.cat([arm, (2 * gripper - 1).unsqueeze(-1)], dim=-1)
        return self.discretiser.discretise(values).flatten(1)

    def forward(self, encoded: dict[str, torch.Tensor], instructions: list[str], bins: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits over the bins. parallel: of all L * A tokens (B, L * A, bins). autoregressive: bins (B, n) of the
        tokens decoded so far -> logits (B, n + 1, bins) of the next ones."""
        prefix = self.lrn_embeds(encoded)[:, -1:]  # (B, 1, K, D): [the state token,] the [LRN] start token
        state, start = prefix[:, :, :-1], prefix[:, :, -1:]
        if self.config.action_head == "mlp":
            hidden = self.backbone(encoded["pixel_values"][:, -1:], instructions, prefix)[:, 0, -1]  # (B, D)
            return self.head(hidden).view(-1, self.tokens_per_step, self.config.bins)
        if self.config.decoding == "parallel":
            suffix = start + self.queries.to(start.dtype)  # (B, 1, L * A, D)
        else:
            previous = self.backbone.embed_tokens(self.action_token_ids[bins]).unsqueeze(1)  # (B, 1, n, D)
            suffix = torch.cat([start, previous.to(start.dtype)], dim=2)
        hidden = self.backbone(encoded["pixel_values"][:, -1:], instructions, torch.cat([state, suffix], dim=2))
        return self.backbone.lm_logits(hidden[:, 0, state.shape[2]:])[..., self.action_token_ids]

    def predict(self, encoded, instructions, generator=None):
        B = encoded["pixel_values"].shape[0]
        if self.config.decoding == "parallel":
            logits = self(encoded, instructions)  # (B, L * A, bins)
        else:
            bins = torch.zeros(B, 0, dtype=torch.long, device=self.lrn.device)
            steps = []
            for _ in range(self.tokens_per_step):
                steps.append(self(encoded, instructions, bins)[:, -1])
                bins = torch.cat([bins, steps[-1].argmax(-1, keepdim=True)], dim=1)
            logits = torch.stack(steps, dim=1)
        if self.config.readout == "expectation":
            centres = self.discretiser.undiscretise(torch.arange(self.config.bins, device=logits.device))
            values = logits.float().softmax(-1) @ centres
        else:
            values = self.discretiser.undiscretise(logits.argmax(-1))
        values = values.view(B, self.chunk, self.action_dim)
        return torch.cat([values[..., :-1], (values[..., -1:] > 0).float()], dim=-1)

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (B, n) of logits (B, n, bins) against target bins (B, n), one-hot or, with label_sigma,
        spread over the neighbouring bins so that a near miss costs less than a far one."""
        if self.config.label_sigma == 0:
            return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        distance = torch.arange(self.config.bins, device=targets.device) - targets.unsqueeze(-1)  # (B, n, bins)
        soft = torch.softmax(-0.5 * (distance / self.config.label_sigma) ** 2, dim=-1)
        return -(soft * logits.log_softmax(-1)).sum(-1)

    def loss(self, batch: dict[str, Any], generator=None):
        encoded = self.encode(batch["images"], batch["state"], batch["instruction"])
        targets = self.tokens(batch["actions"][:, -1])  # (B, L * A)
        teacher = None if self.config.decoding == "parallel" else targets[:, :-1]
        logits = self(encoded, batch["instruction"], teacher)  # (B, L * A, bins)
        mask = batch["action_mask"][:, -1].repeat_interleave(self.action_dim, dim=1).float()  # (B, L * A)
        count = mask.sum().clamp_min(1)
        loss = (self.token_loss(logits.float(), targets) * mask).sum() / count
        with torch.no_grad():
            predicted = logits.argmax(-1)
            correct = (predicted == targets).float()
            error = (self.discretiser.undiscretise(predicted) - self.discretiser.undiscretise(targets)).abs()
            dims = torch.arange(targets.shape[1], device=targets.device) % self.action_dim
            arm, gripper = mask * (dims < self.action_dim - 1), mask * (dims == self.action_dim - 1)
            first_action = mask[:, :self.action_dim]
            # The first token (x of the first action) is the one that can only be read from the observation;
            # under teacher forcing the later ones can be copied from the previous action's tokens.
            metrics = {"token_accuracy": (correct * mask).sum() / count,
                       "first_token_accuracy": correct[:, 0].mean(),
                       "first_action_accuracy": (correct[:, :self.action_dim] * first_action).sum()
                       / first_action.sum().clamp_min(1),
                       "arm_error": (error * arm).sum() / arm.sum().clamp_min(1),
                       "gripper_accuracy": (correct * gripper).sum() / gripper.sum().clamp_min(1)}
        return loss, metrics

"""Action objectives: how a continuous formulation turns its condition state into a chunk of arm actions.

Every continuous formulation computes one condition state per frame (the [LRN] hidden state, or for policy-head
the fused history state); the objective is what reads it:

    regression     an MLP gives the chunk in one pass, trained with MSE, Huber or L1 (RoboVLMs; OpenVLA-OFT's L1)
    flow-matching  an action expert learns the velocity of a straight path from the chunk to Gaussian noise and
                   integrates it back from noise in `denoising_steps` Euler steps (pi0, SmolVLA; Lipman et al.)
    diffusion      the same expert denoises a DDPM forward process (Diffusion Policy), predicting the clean
                   chunk, and samples with `denoising_steps` DDIM steps (diffusers' schedulers)

At rollout the condition is computed once per observation (the backbone pass); only the expert runs in the
denoising loop. The gripper, a binary, is read from the condition in one pass in every objective (regression: a
column of its MLP's output, or with `gripper_head: separate` an MLP of its own as in RoboVLMs; the generative
objectives: an MLP of its own). The arm chunk (L, A-1) in [-1, 1] is what regression predicts and the generative
objectives sample. The MLPs' hidden widths (`head_width`), activation (`head_activation`) and initialisation
(`head_init`) are options; RoboVLMs' heads are [1024, 512, 256] wide, ReLU, Xavier-uniform.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

OBJECTIVES = ("regression", "flow-matching", "diffusion")
ARM_LOSSES = ("mse", "huber", "l1")
HEAD_ACTIVATIONS = ("gelu", "relu")
GRIPPER_HEADS = ("shared", "separate")
HEAD_INITS = ("default", "xavier")
# The formulation options that belong to the objective: reports show them as the "action objective" axis.
OBJECTIVE_OPTIONS = ("objective", "arm_loss", "denoising_steps", "expert_width", "expert_layers")
DIFFUSION_TRAIN_TIMESTEPS = 100  # Diffusion Policy's DDPM: 100 training steps, squared-cosine noise schedule


def describe_objective(config) -> str:
    """The objective of a ContinuousActionConfig in a few words: "regression (l1)", "flow-matching (10 steps)"."""
    if config.objective == "regression":
        return f"regression ({config.arm_loss})"
    return f"{config.objective} ({config.denoising_steps} steps)"


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values (..., L) averaged over the positions where mask (..., L) is 1."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


class ActionObjective(nn.Module):
    """A condition state (..., W) -> a chunk: arm (..., L, A-1) in [-1, 1] and gripper logits (..., L)."""

    def __init__(self, condition_size: int, chunk: int, action_dim: int, config):
        super().__init__()
        self.chunk, self.action_dim, self.arm_dim, self.config = chunk, action_dim, action_dim - 1, config

    def forward(self, condition: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk for rollouts: arm (..., L, A-1), gripper logits (..., L)."""
        raise NotImplementedError

    def arm_loss(self, condition: torch.Tensor, target_arm: torch.Tensor, generator: torch.Generator | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The arm's loss at each position (..., L), the arm chunk it estimates in one pass (..., L, A-1) and
        the gripper logits (..., L)."""
        raise NotImplementedError

    def loss(self, condition: torch.Tensor, target_arm: torch.Tensor, target_gripper: torch.Tensor,
             mask: torch.Tensor, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss on targets arm (..., L, A-1), gripper (..., L) with a mask (..., L) of real actions.
        `arm_error` is the mean absolute error of the arm estimated in one pass (for the generative objectives:
        the clean chunk read off one noisy sample)."""
        mask = mask.float()
        arm_loss, arm_estimate, gripper_logits = self.arm_loss(condition, target_arm.float(), generator)
        arm_loss = masked_mean(arm_loss, mask)
        gripper_loss = masked_mean(F.binary_cross_entropy_with_logits(gripper_logits.float(), target_gripper,
                                                                      reduction="none"), mask)
        with torch.no_grad():
            arm_error = masked_mean((arm_estimate.float() - target_arm).abs().mean(-1), mask)
            gripper_accuracy = masked_mean(((gripper_logits > 0).float() == target_gripper).float(), mask)
        return arm_loss + self.config.gripper_weight * gripper_loss, {
            "arm_loss": arm_loss.detach(), "gripper_loss": gripper_loss.detach(), "arm_error": arm_error,
            "gripper_accuracy": gripper_accuracy}


def action_mlp(condition_size: int, outputs: int, config) -> nn.Sequential:
    """condition (..., condition_size) -> (..., outputs) through the hidden widths of `config.head_width` (one
    width: two layers of it), with `config.head_activation` between them."""
    widths = config.head_width if isinstance(config.head_width, list) else [config.head_width] * 2
    activation = {"gelu": nn.GELU, "relu": nn.ReLU}[config.head_activation]
    layers = []
    for n_in, n_out in zip([condition_size, *widths], widths):
        layers += [nn.Linear(n_in, n_out), activation()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], outputs))


class Regression(ActionObjective):
    """An MLP from the condition to the whole chunk in one pass: the arm through tanh, the gripper's logits from
    the same MLP or (`gripper_head: separate`) from one of its own."""

    def __init__(self, condition_size, chunk, action_dim, config):
        super().__init__(condition_size, chunk, action_dim, config)
        if config.gripper_head == "separate":
            self.mlp = action_mlp(condition_size, chunk * self.arm_dim, config)
            self.gripper = action_mlp(condition_size, chunk, config)
        else:
            self.mlp = action_mlp(condition_size, chunk * action_dim, config)
        self.loss_fn = {"mse": F.mse_loss, "huber": F.smooth_l1_loss, "l1": F.l1_loss}[config.arm_loss]

    def forward(self, condition, generator=None):
        if self.config.gripper_head == "separate":
            arm = self.mlp(condition).unflatten(-1, (self.chunk, self.arm_dim))  # (..., L, A-1)
            return torch.tanh(arm), self.gripper(condition)
        out = self.mlp(condition).unflatten(-1, (self.chunk, self.action_dim))  # (..., L, A)
        return torch.tanh(out[..., :-1]), out[..., -1]

    def arm_loss(self, condition, target_arm, generator):
        arm, gripper_logits = self(condition)
        return self.loss_fn(arm.float(), target_arm, reduction="none").mean(-1), arm, gripper_logits


class TimeEmbedding(nn.Module):
    """A time t (...,) in [0, 1] -> sinusoidal features (..., width), as in transformers' positions."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("frequencies", torch.exp(-math.log(10_000) * torch.arange(width // 2) / (width // 2)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 1000 * t.unsqueeze(-1) * self.frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ActionExpert(nn.Module):
    """The denoiser: a noisy arm chunk (..., L, A-1) and its time (...,), given the condition's features
    (..., width) -> a chunk-shaped output (the velocity for flow matching, the noise for diffusion). A residual MLP
    over the whole chunk. `read_condition` runs once per observation; only `forward` runs at each denoising step,
    and it is kept to a few matrix products because at rollout it runs `denoising_steps` times."""

    TIME_WIDTH = 32

    def __init__(self, condition_size: int, chunk: int, arm_dim: int, width: int, layers: int):
        super().__init__()
        self.chunk, self.arm_dim = chunk, arm_dim
        self.condition = nn.Linear(condition_size, width)
        self.time = TimeEmbedding(self.TIME_WIDTH)
        self.input = nn.Linear(chunk * arm_dim + self.TIME_WIDTH, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
                                    for _ in range(layers))
        self.output = nn.Linear(width, chunk * arm_dim)

    def read_condition(self, condition: torch.Tensor) -> torch.Tensor:
        return self.condition(condition)  # (..., width)

    def forward(self, noisy_arm: torch.Tensor, t: torch.Tensor, condition_features: torch.Tensor) -> torch.Tensor:
        dtype = condition_features.dtype  # the expert's own: times and noisy chunks may come in fp32
        x = F.gelu(self.input(torch.cat([noisy_arm.flatten(-2).to(dtype), self.time(t).to(dtype)], dim=-1))
                   + condition_features)
        for block in self.blocks:
            x = x + block(x)  # (..., width)
        return self.output(x).unflatten(-1, (self.chunk, self.arm_dim))  # (..., L, A-1)


class GenerativeObjective(ActionObjective):
    """An objective whose arm chunk an ActionExpert samples from noise in `denoising_steps` passes; the gripper's
    logits come from an MLP on the condition, in one pass."""

    def __init__(self, condition_size, chunk, action_dim, config):
        super().__init__(condition_size, chunk, action_dim, config)
        self.gripper = action_mlp(condition_size, chunk, config)
        self.expert = ActionExpert(condition_size, chunk, self.arm_dim, config.expert_width, config.expert_layers)

    def forward(self, condition, generator=None):
        return self.sample_arm(condition, generator), self.gripper(condition)

    def noise_like(self, condition: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
                   ) -> torch.Tensor:
        """Gaussian noise (..., L, A-1), drawn where the generator lives (a CPU one for a model on a GPU). With a
        list of generators, one per row of condition (B, W), row b's noise comes from the b-th alone: an episode's
        noise is the same whichever episodes share its batch."""
        if isinstance(generator, (list, tuple)):
            if condition.dim() != 2 or len(generator) != condition.shape[0]:
                raise ValueError(f"{len(generator)} generators for conditions of shape {tuple(condition.shape)}: "
                                 f"give one per row of a (B, W) condition")
            noise = [torch.randn((self.chunk, self.arm_dim), generator=g, device=g.device) for g in generator]
            return torch.stack(noise).to(condition.device, condition.dtype)  # (B, L, A-1)
        shape = (*condition.shape[:-1], self.chunk, self.arm_dim)
        device = generator.device if generator is not None else condition.device
        return torch.randn(shape, generator=generator, device=device).to(condition.device, condition.dtype)

    def times(self, condition: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One time in [0, 1) per condition (...,)."""
        device = generator.device if generator is not None else condition.device
        return torch.rand(condition.shape[:-1], generator=generator, device=device).to(condition.device)

    def sample_arm(self, condition: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError


class FlowMatching(GenerativeObjective):
    """pi0's flow: x_t = t * noise + (1 - t) * arm for t ~ U(0, 1); the expert learns the velocity noise - arm,
    and sampling integrates it from pure noise at t = 1 to t = 0 in `denoising_steps` Euler steps. Hand-written:
    these few lines are the whole method, and diffusers' FlowMatchEulerDiscreteScheduler is built around image
    generation (resolution-dependent time shifts, sigmas on a 1000-step grid)."""

    def arm_loss(self, condition, target_arm, generator):
        noise = self.noise_like(condition, generator)
        t = self.times(condition, generator)
        noisy = t[..., None, None] * noise + (1 - t[..., None, None]) * target_arm
        velocity = self.expert(noisy, t, self.expert.read_condition(condition))
        loss = F.mse_loss(velocity.float(), noise - target_arm, reduction="none").mean(-1)
        return loss, (noisy - t[..., None, None] * velocity).clamp(-1, 1), self.gripper(condition)

    def sample_arm(self, condition, generator=None):
        features = self.expert.read_condition(condition)  # once: the loop below reruns only the expert
        arm = self.noise_like(condition, generator)
        steps = self.config.denoising_steps
        for i in range(steps):
            t = torch.full(condition.shape[:-1], 1 - i / steps, device=condition.device)
            arm = arm - self.expert(arm, t, features) / steps
        return arm.clamp(-1, 1)


class Diffusion(GenerativeObjective):
    """Diffusion Policy's DDPM (100 steps, squared-cosine schedule; diffusers' DDPMScheduler adds the noise) and DDIM
    sampling in `denoising_steps` steps (diffusers' DDIMScheduler, deterministic: eta 0). The expert predicts the
    clean chunk (prediction_type "sample") rather than the noise as Diffusion Policy does: measured on the demo
    tasks, noise prediction scored 30% at 10 DDIM steps and 0% at 50, clean-chunk prediction 63% at both
    (docs/formulations.md)."""

    def __init__(self, condition_size, chunk, action_dim, config):
        super().__init__(condition_size, chunk, action_dim, config)
        from diffusers import DDIMScheduler, DDPMScheduler

        self.training_scheduler = DDPMScheduler(num_train_timesteps=DIFFUSION_TRAIN_TIMESTEPS,
                                                beta_schedule="squaredcos_cap_v2", clip_sample=True,
                                                prediction_type="sample")
        self.sampling_scheduler = DDIMScheduler.from_config(self.training_scheduler.config)
        self.sampling_scheduler.set_timesteps(config.denoising_steps)

    def arm_loss(self, condition, target_arm, generator):
        noise = self.noise_like(condition, generator)
        timesteps = (self.times(condition, generator) * DIFFUSION_TRAIN_TIMESTEPS).long()  # (...,) in 0..T-1
        noisy = self.training_scheduler.add_noise(target_arm.flatten(0, -3), noise.flatten(0, -3),
                                                  timesteps.flatten()).view_as(target_arm)
        predicted = self.expert(noisy, timesteps.float() / DIFFUSION_TRAIN_TIMESTEPS,
                                self.expert.read_condition(condition))
        loss = F.mse_loss(predicted.float(), target_arm, reduction="none").mean(-1)
        return loss, predicted.clamp(-1, 1), self.gripper(condition)

    def sample_arm(self, condition, generator=None):
        features = self.expert.read_condition(condition)  # once: the loop below reruns only the expert
        arm = self.noise_like(condition, generator)
        for timestep in self.sampling_scheduler.timesteps:
            t = torch.full(condition.shape[:-1], timestep.item() / DIFFUSION_TRAIN_TIMESTEPS, device=condition.device)
            arm = self.sampling_scheduler.step(self.expert(arm, t, features), timestep, arm).prev_sample
        return arm.clamp(-1, 1)


def create_action_objective(config, condition_size: int, chunk: int, action_dim: int) -> ActionObjective:
    """The objective a ContinuousActionConfig names, reading a condition state of `condition_size`. With
    `head_init: xavier`, every nn.Linear of it starts Xavier-uniform with zero biases, as RoboVLMs'
    `initialize_param` starts its action MLPs."""
    objective_class = {"regression": Regression, "flow-matching": FlowMatching, "diffusion": Diffusion}
    objective = objective_class[config.objective](condition_size, chunk, action_dim, config)
    if config.head_init == "xavier":
        for module in objective.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
    return objective

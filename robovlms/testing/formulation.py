"""The formulation conformance kit: what every formulation plugin must do for training, rollouts and sweeps to be
right, on every built-in backbone.

Each `check_*` function takes a freshly built formulation (a tiny random-init backbone, seeded), raises
AssertionError with a one-line reason when the formulation breaks the interface, and returns a one-line summary when
it keeps it; use them in a plugin's own pytest suite, or run them all at once:

    robovlms check-formulation gru-head --option gru_width=32        # from the command line
    assert_formulation_conforms("gru-head", gru_width=32)            # in a test

Windows are random and shaped as `robovlms.data.windows.WindowDataset` gives them: two windows of H frames and two
cameras, the second starting at its episode's first step (its first frame padding) and ending early (its last
actions masked). Action statistics are lopsided, so that a formulation normalising with the wrong ones is caught.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Callable

import torch

from robovlms.backbone import create_backbone
from robovlms.data.store import Statistics
from robovlms.formulation import Formulation, create_formulation
from robovlms.registry import BACKBONES, FORMULATIONS
from robovlms.testing.checks import CheckResult, close, differ, fail, run_check

ACTION_LOW, ACTION_HIGH = [-2.0, -0.5, 0.0, -1.0], [2.0, 0.5, 1.0, 1.0]  # x, y, z, gripper
STATE_LOW, STATE_HIGH = [-1.0, 0.0, -3.0, -1.0, 0.0], [1.0, 2.0, 3.0, 1.0, 0.5]
INSTRUCTIONS = ["press the button from the top", "open the door"]  # different lengths: rows get padded
HISTORY, CHUNK, VIEWS = 3, 3, 2


def statistics(low: list[float], high: list[float]) -> Statistics:
    mean = [(a + b) / 2 for a, b in zip(low, high)]
    return Statistics(p01=low, p99=high, mean=mean, std=[(b - a) / 4 for a, b in zip(low, high)], min=low, max=high)


def build_formulation(name: str, backbone, **options) -> Formulation:
    """Formulation `name` on `backbone` with the kit's statistics, the proprio state, a chunk of CHUNK and (unless it
    sees one frame) a history of HISTORY; `options` are its own options or override these settings."""
    history = 1 if FORMULATIONS.get(name).single_frame else HISTORY
    settings = {"history": history, "chunk": CHUNK, "use_state": True, **options}
    return create_formulation(name, backbone, statistics(ACTION_LOW, ACTION_HIGH), statistics(STATE_LOW, STATE_HIGH),
                              **settings)


def rebuild(formulation: Formulation) -> Formulation:
    """A formulation of the same class and settings on a copy of its backbone, freshly initialised: what loading a
    checkpoint starts from."""
    settings = {"history": formulation.history, "chunk": formulation.chunk, "use_state": formulation.use_state,
                "state_input": "token" if formulation.state_token else "add", **dataclasses.asdict(formulation.config)}
    return type(formulation)(copy.deepcopy(formulation.backbone), statistics(ACTION_LOW, ACTION_HIGH),
                             statistics(STATE_LOW, STATE_HIGH), **settings)


def random_windows(formulation: Formulation, batch: int = 2, seed: int = 0) -> dict:
    """A batch of training windows for `formulation`, as WindowDataset gives them (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    B, T, L, S = batch, formulation.history, formulation.chunk, formulation.backbone.image_size

    def uniform(low, high, *shape):
        low, high = torch.tensor(low), torch.tensor(high)
        return low + (high - low) * torch.rand(*shape, len(low), generator=generator)

    images = torch.randint(0, 256, (B, T, VIEWS, S, S, 3), dtype=torch.uint8, generator=generator)
    state = uniform(STATE_LOW, STATE_HIGH, B, T)
    actions = uniform(ACTION_LOW, ACTION_HIGH, B, T, L)
    actions[..., -1] = torch.where(torch.rand(B, T, L, generator=generator) > 0.5, 1.0, -1.0)
    frame_mask, action_mask = torch.ones(B, T, dtype=torch.bool), torch.ones(B, T, L, dtype=torch.bool)
    if B > 1:
        action_mask[1, -1, 1:] = False  # the episode ends after the last frame's first action
        if T > 1:  # the window starts at the episode's first step: frame 0 repeats frame 1
            images[1, 0], state[1, 0], actions[1, 0] = images[1, 1], state[1, 1], actions[1, 1]
            frame_mask[1, 0], action_mask[1, 0] = False, False
    return {"images": images, "state": state, "actions": actions, "action_mask": action_mask,
            "frame_mask": frame_mask, "task": torch.zeros(B, dtype=torch.long),
            "instruction": [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(B)]}


def _row(windows: dict, i: int) -> dict:
    return {key: value[i:i + 1] for key, value in windows.items()}


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _predict(formulation: Formulation, windows: dict, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        encoded = formulation.encode(windows["images"], windows["state"], windows["instruction"])
        return formulation.predict(encoded, windows["instruction"], _seeded(seed))


def _samples(formulation: Formulation, windows: dict) -> bool:
    """Whether `predict` draws from its generator: two seeds, two chunks."""
    return not torch.equal(_predict(formulation, windows, 0), _predict(formulation, windows, 1))


# ---- the checks ----------------------------------------------------------------------------------------------


def check_loss(formulation: Formulation) -> str:
    """`loss` is a finite scalar with finite scalar metrics (arm_error and gripper_accuracy among them); its gradient
    reaches the backbone and every parameter of the formulation's own (multi-GPU training, DDP, needs each one used);
    it reads action_mask (actions past an episode's end, 0 there, would count otherwise). Whether masked actions may
    still change the loss depends on the objective: a denoiser reads the whole chunk, padding included."""
    windows = random_windows(formulation)
    formulation.train()
    loss, metrics = formulation.loss(windows, _seeded(0))
    if not (torch.is_tensor(loss) and loss.dim() == 0 and loss.is_floating_point() and torch.isfinite(loss)):
        fail(f"loss is {loss!r}: expected a finite scalar tensor")
    for key, value in metrics.items():
        if not (torch.is_tensor(value) and value.dim() == 0 and torch.isfinite(value)) or value.requires_grad:
            fail(f"metric {key} is {value!r}: expected a finite, detached scalar tensor")
    missing = {"arm_error", "gripper_accuracy"} - set(metrics)
    if missing:
        fail(f"metrics lack {', '.join(sorted(missing))}, which reports compare across formulations")
    loss.backward()
    backbone = {id(p) for p in formulation.backbone.parameters()}
    own = [(name, p) for name, p in formulation.named_parameters() if id(p) not in backbone and p.requires_grad]
    unused = [name for name, p in own if p.grad is None]
    if unused:
        fail(f"parameters {unused[:3]} get no gradient from the loss: multi-GPU training (DDP) stops at them")
    if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in formulation.backbone.parameters()):
        fail("no gradient reaches the backbone")
    formulation.eval()  # no dropout: only the mask changes
    unmasked = {**windows, "action_mask": torch.ones_like(windows["action_mask"])}
    with torch.no_grad():
        masked, counted = formulation.loss(windows, _seeded(0))[0], formulation.loss(unmasked, _seeded(0))[0]
    if close(masked, counted):
        fail(f"the loss is {masked.item():.4g} whether or not the actions past the episode's end count: "
             f"action_mask is not read")
    return f"loss {loss.item():.3g}, metrics {', '.join(sorted(metrics))}; gradients reach the backbone and all " \
        f"{len(own)} own parameters; action_mask is read"


def check_predict(formulation: Formulation) -> str:
    """`encode` gives per-frame tensors (B, T, ...); `predict` the chunk (B, L, A) for the last frame: the arm
    normalised in [-1, 1], then the gripper's probability of closing in [0, 1]."""
    windows = random_windows(formulation)
    formulation.eval()
    B, T, L, A = len(windows["instruction"]), formulation.history, formulation.chunk, len(ACTION_LOW)
    with torch.no_grad():
        encoded = formulation.encode(windows["images"], windows["state"], windows["instruction"])
        if not isinstance(encoded, dict) or not all(torch.is_tensor(v) for v in encoded.values()):
            fail(f"encode gives {type(encoded).__name__}: expected a dict of tensors")
        for key, value in encoded.items():
            if tuple(value.shape[:2]) != (B, T):
                fail(f"encode's {key} is {tuple(value.shape)}: expected (batch {B}, frames {T}, ...), so that the "
                     f"rollout policy can keep each frame's")
        predicted = formulation.predict(encoded, windows["instruction"], _seeded(0))
    if tuple(predicted.shape) != (B, L, A) or not torch.isfinite(predicted).all():
        fail(f"predict gives {tuple(predicted.shape)}{'' if torch.isfinite(predicted).all() else ', not finite'}: "
             f"expected finite (batch {B}, chunk {L}, action {A})")
    arm, gripper = predicted[..., :-1], predicted[..., -1]
    if arm.abs().max() > 1 + 1e-6:
        fail(f"the arm reaches {arm.abs().max().item():.3g}: predict gives it normalised, in [-1, 1]")
    if gripper.min() < 0 or gripper.max() > 1:
        fail(f"the gripper ranges {gripper.min().item():.3g}..{gripper.max().item():.3g}: predict gives its "
             f"probability of closing, in [0, 1]")
    return f"encode: {', '.join(sorted(encoded))} per frame; predict: ({B}, {L}, {A}) in range"


def check_act(formulation: Formulation) -> str:
    """`act` gives raw actions (B, L, A): `predict`'s chunk un-normalised with the store's statistics (the arm within
    its 1st-99th percentiles, the gripper -1 or +1), as the rollout policy executes it."""
    windows = random_windows(formulation)
    formulation.eval()
    with torch.no_grad():
        actions = formulation.act(windows["images"], windows["state"], windows["instruction"], _seeded(0))
        predicted = _predict(formulation, windows, 0)
    expected = formulation.actions.unnormalise(predicted[..., :-1].float(), predicted[..., -1].float())
    if actions.shape != expected.shape or not close(actions, expected):
        fail(f"act gives {tuple(actions.shape)} that differs from predict's chunk un-normalised "
             f"{tuple(expected.shape)}: the rollout policy executes the latter")
    low, high = torch.tensor(ACTION_LOW[:-1]), torch.tensor(ACTION_HIGH[:-1])
    if ((actions[..., :-1] < low - 1e-5) | (actions[..., :-1] > high + 1e-5)).any():
        fail("the arm leaves the statistics' 1st-99th percentiles")
    if not set(actions[..., -1].unique().tolist()) <= {-1.0, 1.0}:
        fail(f"gripper values {sorted(set(actions[..., -1].unique().tolist()))[:4]}: expected -1 (open) or +1 (closed)")
    return "predict's chunk un-normalised, the arm within the percentiles, the gripper -1 or +1"


def check_rollout_encoding(formulation: Formulation) -> str:
    """Frames encoded one at a time, as the rollout policy encodes each new observation once and keeps it, predict
    the same chunk as the window encoded at once: no frame's encoding depends on another's."""
    windows = random_windows(formulation)
    formulation.eval()
    with torch.no_grad():
        whole = formulation.encode(windows["images"], windows["state"], windows["instruction"])
        frames = [formulation.encode(windows["images"][:, t:t + 1], windows["state"][:, t:t + 1],
                                     windows["instruction"]) for t in range(formulation.history)]
        stitched = {key: torch.cat([frame[key] for frame in frames], dim=1) for key in whole}
        for key in whole:
            if not close(whole[key], stitched[key]):
                fail(f"encode's {key} of a frame depends on the other frames of its window "
                     f"({differ(whole[key], stitched[key])}): the rollout policy encodes each frame alone")
        at_once = formulation.predict(whole, windows["instruction"], _seeded(0))
        one_by_one = formulation.predict(stitched, windows["instruction"], _seeded(0))
    if not close(at_once, one_by_one):
        fail(f"predict from frames encoded one at a time and from the whole window {differ(at_once, one_by_one)}")
    return f"{formulation.history} frame(s) encoded one at a time predict the same chunk"


def check_batching(formulation: Formulation) -> str:
    """A window's encoding and (when `predict` does not sample) its chunk are the same alone and in a batch
    (padded instructions, other windows, batch statistics)."""
    windows = random_windows(formulation)
    formulation.eval()
    with torch.no_grad():
        batched = formulation.encode(windows["images"], windows["state"], windows["instruction"])
        for i in range(len(windows["instruction"])):
            alone = formulation.encode(*(_row(windows, i)[key] for key in ("images", "state")),
                                       windows["instruction"][i:i + 1])
            for key in batched:
                if not close(batched[key][i:i + 1], alone[key]):
                    fail(f"window {i}'s encoding {key} alone and in a batch {differ(batched[key][i:i + 1], alone[key])}")
    if _samples(formulation, windows):
        return "encodings are the same alone and in a batch (predict samples: its chunks depend on the noise drawn)"
    predicted = _predict(formulation, windows)
    for i in range(len(windows["instruction"])):
        alone = _predict(formulation, _row(windows, i))
        if not close(predicted[i:i + 1], alone):
            fail(f"window {i}'s chunk alone and in a batch {differ(predicted[i:i + 1], alone)}")
    return "encodings and chunks are the same alone and in a batch"


def _shape_only_forward(backbone):
    """The backbone's forward as shapes alone, for meta tensors (the backbones' own need values: token ids, masks):
    hidden states (B, T, K, D) from inputs that must be on the meta device."""

    def forward(self, pixel_values, instructions, suffix_embeds, interleaved=False, instruction_per_frame=False):
        for what, tensor in (("pixel_values", pixel_values), ("suffix_embeds", suffix_embeds)):
            if tensor.device.type != "meta":
                fail(f"the backbone is given {what} on {tensor.device}, not on the model's device")
        return suffix_embeds.new_empty(*suffix_embeds.shape[:3], self.hidden_size)

    return types.MethodType(forward, backbone)


def check_device(formulation: Formulation) -> str:
    """On another device (meta tensors stand in for a GPU: no values, and an error for any tensor made on the CPU
    that meets one), loss, encode, predict and act run with a CPU generator, as the rollout policy's, and give their
    results on that device."""
    formulation.to("meta")
    formulation.backbone.forward = _shape_only_forward(formulation.backbone)
    windows = {key: value.to("meta") if torch.is_tensor(value) else value
               for key, value in random_windows(formulation).items()}
    loss, metrics = formulation.loss(windows, _seeded(0))
    with torch.no_grad():
        encoded = formulation.encode(windows["images"], windows["state"], windows["instruction"])
        predicted = formulation.predict(encoded, windows["instruction"], _seeded(0))
        actions = formulation.act(windows["images"], windows["state"], windows["instruction"], _seeded(0))
    results = {"loss": loss, **{f"metric {k}": v for k, v in metrics.items()},
               **{f"encoding {k}": v for k, v in encoded.items()}, "predict": predicted, "act": actions}
    elsewhere = [what for what, value in results.items() if value.device.type != "meta"]
    if elsewhere:
        fail(f"{', '.join(elsewhere)} come back on the CPU, not on the model's device")
    return "loss, encode, predict and act on the model's device with a CPU generator"


def check_seeding(formulation: Formulation) -> str:
    """The same generator seed gives the same chunk, action and loss; a generator passed to predict and act is the
    only randomness they draw from (the rollout policy seeds one per episode)."""
    windows = random_windows(formulation)
    formulation.eval()
    global_state = torch.get_rng_state()
    first, again = _predict(formulation, windows, 0), _predict(formulation, windows, 0)
    with torch.no_grad():
        acts = [formulation.act(windows["images"], windows["state"], windows["instruction"], _seeded(0))
                for _ in range(2)]
    if not torch.equal(torch.get_rng_state(), global_state):
        fail("predict or act draws from torch's global generator, not (only) the one it is given")
    if not torch.equal(first, again) or not torch.equal(*acts):
        fail(f"the same generator seed gives different chunks ({differ(first, again)})")
    formulation.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(0)  # dropout draws from the global generator in training
        losses.append(formulation.loss(windows, _seeded(0))[0].detach())
    if not torch.equal(*losses):
        fail(f"the same seeds give different losses ({losses[0].item():.6g}, {losses[1].item():.6g})")
    samples = _samples(formulation, windows)
    return "the same seed, the same chunk, action and loss" + (
        "; other seeds, other samples" if samples else "; predict draws no noise")


def check_checkpoint(formulation: Formulation) -> str:
    """A formulation rebuilt from the same settings and given this one's state dict (what a checkpoint holds)
    predicts the same chunks: nothing it needs is made after construction or kept outside its state dict."""
    windows = random_windows(formulation)
    torch.manual_seed(1)
    rebuilt = rebuild(formulation)
    with torch.no_grad():
        for parameter in formulation.parameters():  # as if trained: nothing left at its initial value
            parameter.add_(torch.randn_like(parameter) * 0.05)
    formulation.eval()
    expected = _predict(formulation, windows)
    missing, unexpected = rebuilt.load_state_dict(formulation.state_dict(), strict=False)
    if missing or unexpected:
        fail(f"the state dict does not fit a formulation built with the same settings: missing {missing[:3]}, "
             f"unexpected {unexpected[:3]}")
    got = _predict(rebuilt.eval(), windows)
    if not close(expected, got):
        fail(f"the rebuilt formulation's chunks {differ(expected, got)}")
    return f"{len(formulation.state_dict())} tensors in its state dict rebuild the same chunks"


CHECKS: dict[str, Callable[[Formulation], str]] = {
    "loss": check_loss,
    "predict": check_predict,
    "act": check_act,
    "rollout encoding": check_rollout_encoding,
    "batching": check_batching,
    "device": check_device,
    "seeding": check_seeding,
    "checkpoint": check_checkpoint,
}


# ---- running them --------------------------------------------------------------------------------------------


def built_in_backbones() -> list[str]:
    """The backbones robovlms itself ships (plugins of other packages are checked when named)."""
    return [source.name for source in BACKBONES.sources() if source.distribution == "robovlms"]


def check_formulation(name: str, backbones: list[str] | None = None, **options) -> dict[str, list[CheckResult]]:
    """Every check on formulation `name` built with `options`, on each of `backbones` (default: every built-in
    one): backbone -> results. Each check gets a fresh formulation on a fresh copy of the tiny backbone, seeded."""
    backbones = backbones or built_in_backbones()
    # a plugin that does not load, or options it does not take, are one clear error, not a table of failed checks
    build_formulation(name, create_backbone(backbones[0]), **options)
    results = {}
    for backbone_name in backbones:
        torch.manual_seed(0)
        backbone = create_backbone(backbone_name)
        results[backbone_name] = []
        for check, function in CHECKS.items():
            torch.manual_seed(0)
            results[backbone_name].append(run_check(check, _on_fresh_formulation, function, name, backbone, options))
    return results


def _on_fresh_formulation(check: Callable[[Formulation], str], name: str, backbone, options: dict) -> str:
    return check(build_formulation(name, copy.deepcopy(backbone), **options))


def assert_formulation_conforms(name: str, backbones: list[str] | None = None, **options
                                ) -> dict[str, list[CheckResult]]:
    """For a plugin's test suite: every check passes on every backbone, else one AssertionError listing the
    failures."""
    results = check_formulation(name, backbones, **options)
    failures = [f"{backbone} / {result.check}: {result.reason}" for backbone, checks in results.items()
                for result in checks if not result.passed]
    if failures:
        raise AssertionError(f"formulation {name!r} fails {len(failures)} conformance check(s):\n" + "\n".join(failures))
    return results

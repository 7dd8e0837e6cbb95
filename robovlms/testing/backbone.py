"""The backbone conformance kit: what every backbone plugin must do for the formulations to be right.

Each `check_*` function takes a freshly built backbone, raises AssertionError with a one-line reason when the
backbone breaks the interface, and returns a one-line summary when it keeps it; use them in a plugin's own
pytest suite, or run them all at once:

    robovlms check-backbone qwen2vl --option hidden_size=32          # from the command line
    assert_backbone_conforms("qwen2vl", hidden_size=32)              # in a test

Images are random, at the backbone's own image size; comparisons run in eval mode without gradients.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from robovlms.backbone import FREEZE_MODES, MAX_IMAGE_SIZE, Backbone, create_backbone, load_backbone
from robovlms.errors import HiddenSizeError
from robovlms.testing.checks import CheckResult, SkipCheck, close, differ, fail, run_check

INSTRUCTIONS = ["press the button from the top", "open the door"]  # different lengths: rows get padded
MAX_IMAGE_SLOTS = 4096  # image tokens per image; more means the image size is wrong (a 4096-pixel "side")
REFERENCE_TOLERANCE = 1e-4  # against the wrapped model's own forward, which computes in another order


# ---- inputs --------------------------------------------------------------------------------------------------


def random_images(backbone: Backbone, batch: int, frames: int, views: int, seed: int = 0) -> torch.Tensor:
    """uint8 (B, T, V, S, S, 3) at the backbone's own image size."""
    generator = torch.Generator().manual_seed(seed)
    S = backbone.image_size
    return torch.randint(0, 256, (batch, frames, views, S, S, 3), dtype=torch.uint8, generator=generator)


def random_suffix(backbone: Backbone, batch: int, frames: int, length: int, seed: int = 0) -> torch.Tensor:
    """(B, T, K, D) suffix embeddings in the scale of the model's own token embeddings."""
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, backbone.tokenizer.vocab_size, (batch, frames, length), generator=generator)
    with torch.no_grad():
        return backbone.embed_tokens(token_ids)


def _hidden(backbone: Backbone, images: torch.Tensor, instructions: list[str], suffix: torch.Tensor,
            interleaved: bool) -> torch.Tensor:
    backbone.eval()
    with torch.no_grad():
        return backbone(backbone.preprocess_images(images), instructions, suffix, interleaved=interleaved)


LAYOUTS = {"per frame": False, "interleaved": True}


# ---- the checks ----------------------------------------------------------------------------------------------


def check_image_settings(backbone: Backbone) -> str:
    """An image size the vision tower takes, mean and std of three channels in range, a sane number of image
    slots, and preprocessed pixels of a normal magnitude."""
    S = backbone.image_size
    if not 8 <= S <= MAX_IMAGE_SIZE:
        fail(f"image_size {S} is no image side (8 to {MAX_IMAGE_SIZE} px): an image processor's size read wrongly?")
    mean, std = backbone.image_mean.flatten().tolist(), backbone.image_std.flatten().tolist()
    if len(mean) != 3 or not all(0 <= m <= 1 for m in mean):
        fail(f"image_mean {mean} must be three values in [0, 1] (pixels rescaled to [0, 1])")
    if len(std) != 3 or not all(0 < s <= 1 for s in std):
        fail(f"image_std {std} must be three values in (0, 1]")
    before, slots, after = backbone.image_block()
    if not 0 <= slots <= MAX_IMAGE_SLOTS:
        fail(f"{slots} image slots per image (more than {MAX_IMAGE_SLOTS}): is image_size {S} right?")
    vocabulary = backbone.input_embeddings().num_embeddings
    if not all(0 <= i < vocabulary for i in before + after):
        fail(f"image block ids {before} ... {after} are outside the vocabulary of {vocabulary}")
    pixels = backbone.preprocess_images(random_images(backbone, 1, 1, 1))
    if not torch.isfinite(pixels).all() or pixels.abs().max() > 10:
        fail(f"preprocessed pixels reach {pixels.abs().max().item():.3g}: mean/std or rescale_factor wrong?")
    return f"{S} px, mean {[round(m, 3) for m in mean]}, std {[round(s, 3) for s in std]}, {slots} image slots"


def check_forward_and_gradients(backbone: Backbone) -> str:
    """Hidden states of shape (B, T, K, D) in both layouts with several frames and views; gradients reach the
    suffix embeddings and the vision modules."""
    B, T, V, K, D = 2, 2, 2, 2, backbone.hidden_size
    for layout, interleaved in LAYOUTS.items():
        backbone.zero_grad(set_to_none=True)
        suffix = random_suffix(backbone, B, T, K).requires_grad_(True)
        hidden = backbone(backbone.preprocess_images(random_images(backbone, B, T, V)), INSTRUCTIONS, suffix,
                          interleaved=interleaved)
        if hidden.shape != (B, T, K, D):
            fail(f"{layout}: hidden states of shape {tuple(hidden.shape)}, expected {(B, T, K, D)}")
        if not torch.isfinite(hidden).all():
            fail(f"{layout}: hidden states are not finite")
        hidden.pow(2).sum().backward()
        if suffix.grad is None or suffix.grad.abs().sum() == 0:
            fail(f"{layout}: no gradient reaches the suffix embeddings")
        vision = [p.grad for m in backbone.vision_modules() for p in m.parameters() if p.grad is not None]
        if not any(g.abs().sum() > 0 for g in vision):
            fail(f"{layout}: no gradient reaches the vision modules: the images do not reach the output")
    return f"{(B, T, K, D)} in both layouts ({V} views); gradients reach the suffix and the vision modules"


def check_suffix_causality(backbone: Backbone) -> str:
    """No hidden state depends on a suffix embedding after it: changing the last frame's last suffix embedding
    changes the hidden state at that position only."""
    images, suffix = random_images(backbone, 2, 2, 1), random_suffix(backbone, 2, 2, 2)
    changed = suffix.clone()
    changed[:, -1, -1] = random_suffix(backbone, 2, 1, 1, seed=1)[:, 0, 0]
    for layout, interleaved in LAYOUTS.items():
        before = _hidden(backbone, images, INSTRUCTIONS, suffix, interleaved)
        after = _hidden(backbone, images, INSTRUCTIONS, changed, interleaved)
        unchanged = torch.ones(before.shape[:3], dtype=torch.bool)
        unchanged[:, -1, -1] = False
        if not close(before[unchanged], after[unchanged]):
            fail(f"{layout}: earlier positions see the last suffix embedding (outputs "
                 f"{differ(before[unchanged], after[unchanged])})")
        if close(before[:, -1, -1], after[:, -1, -1]):
            fail(f"{layout}: the last suffix position ignores its own embedding")
    return "no position sees a suffix embedding after it, in both layouts"


def check_frame_causality(backbone: Backbone) -> str:
    """Interleaved: the suffix of frame t sees frames up to t only. Per frame: each row sees its own frame only."""
    images, suffix = random_images(backbone, 2, 3, 2), random_suffix(backbone, 2, 3, 1)
    last_changed, first_changed = images.clone(), images.clone()
    last_changed[:, 2] = random_images(backbone, 2, 1, 2, seed=1)[:, 0]
    first_changed[:, 0] = random_images(backbone, 2, 1, 2, seed=1)[:, 0]
    before = _hidden(backbone, images, INSTRUCTIONS, suffix, True)
    after = _hidden(backbone, last_changed, INSTRUCTIONS, suffix, True)
    if not close(before[:, :2], after[:, :2]):
        fail(f"interleaved: frames 0-1 see the images of frame 2 (outputs {differ(before[:, :2], after[:, :2])})")
    if close(before[:, 2], after[:, 2]):
        fail("interleaved: frame 2 ignores its own images")
    before = _hidden(backbone, images, INSTRUCTIONS, suffix, False)
    after = _hidden(backbone, first_changed, INSTRUCTIONS, suffix, False)
    if not close(before[:, 1:], after[:, 1:]):
        fail(f"per frame: frames 1-2 see the images of frame 0 (outputs {differ(before[:, 1:], after[:, 1:])})")
    if close(before[:, 0], after[:, 0]):
        fail("per frame: frame 0 ignores its own images")
    return "interleaved frames see the frames up to their own; per-frame rows their own frame only"


def check_batch_independence(backbone: Backbone) -> str:
    """A sample's hidden states do not depend on the rest of its batch (padding, other instructions)."""
    images, suffix = random_images(backbone, 2, 2, 1), random_suffix(backbone, 2, 2, 1)
    for layout, interleaved in LAYOUTS.items():
        batched = _hidden(backbone, images, INSTRUCTIONS, suffix, interleaved)
        alone = _hidden(backbone, images[1:], INSTRUCTIONS[1:], suffix[1:], interleaved)
        if not close(batched[1:], alone):
            fail(f"{layout}: a sample alone and in a batch {differ(batched[1:], alone)}")
    return "a sample's output is the same alone and in a padded batch, in both layouts"


def check_save_and_load(backbone: Backbone) -> str:
    """`save` then `load_backbone` rebuilds identical outputs, label, tokenizer and trainable parameters, with
    appended action tokens and frozen vision, and again with LoRA adapters."""
    with torch.no_grad():
        for parameter in backbone.parameters():  # as if trained: nothing left at its initial value
            parameter.add_(torch.randn_like(parameter) * 0.05)
    action_ids = backbone.reserve_action_tokens(4, mode="append")
    backbone.freeze("frozen-vision")
    images = random_images(backbone, 2, 2, 2)
    suffix = backbone.embed_tokens(action_ids[:2]).detach().view(1, 1, 2, -1).expand(2, 2, 2, -1)
    _compare_after_loading(backbone, images, suffix)
    return "save / load_backbone rebuild identical outputs (action tokens appended, frozen vision)"


def _compare_after_loading(backbone: Backbone, images: torch.Tensor, suffix: torch.Tensor) -> None:
    with tempfile.TemporaryDirectory() as directory:
        backbone.save(Path(directory) / "backbone")
        loaded = load_backbone(Path(directory) / "backbone")
    for layout, interleaved in LAYOUTS.items():
        original = _hidden(backbone, images, INSTRUCTIONS, suffix, interleaved)
        rebuilt = _hidden(loaded, images, INSTRUCTIONS, suffix, interleaved)
        if not torch.equal(original, rebuilt):
            fail(f"{layout}: the loaded backbone's outputs {differ(original, rebuilt)}")
    if loaded.label != backbone.label:
        fail(f"loaded label {loaded.label!r} is not {backbone.label!r}")
    if len(loaded.tokenizer) != len(backbone.tokenizer):
        fail(f"loaded tokenizer has {len(loaded.tokenizer)} tokens, not {len(backbone.tokenizer)}")
    if _trainable(loaded) != _trainable(backbone):
        fail(f"loaded trainable parameters differ: {sorted(_trainable(loaded) ^ _trainable(backbone))[:3]} ...")


def check_lora_save_and_load(backbone: Backbone) -> str:
    """With LoRA adapters (`freeze("lora")`), `save` then `load_backbone` rebuilds identical outputs."""
    backbone.freeze("lora", lora_rank=2)
    with torch.no_grad():
        for name, parameter in backbone.named_parameters():
            if "lora_B" in name:  # zero at init; make the adapters matter
                parameter.normal_(std=0.1)
    _compare_after_loading(backbone, random_images(backbone, 2, 1, 1), random_suffix(backbone, 2, 1, 1))
    return "save / load_backbone keep LoRA adapters"


def check_lora_on_all_linear_layers(backbone: Backbone) -> str:
    """`freeze("lora", lora_targets="all-linear")` puts adapters on every nn.Linear outside the vision modules
    but the LM head and on nothing else, only they train, and `save` then `load_backbone` keeps them."""
    backbone.freeze("lora", lora_rank=2, lora_targets="all-linear")
    vision = {id(module) for tower in backbone.vision_modules() for module in tower.modules()}
    head = backbone.output_embeddings()
    adapted = {name for name, module in backbone.model.named_modules() if hasattr(module, "lora_A")}
    linear = {name.removesuffix(".base_layer") for name, module in backbone.model.named_modules()
              if isinstance(module, torch.nn.Linear) and ".lora_" not in name and id(module) not in vision
              and module is not head}  # an adapted layer keeps its nn.Linear as .base_layer
    if adapted != linear:
        fail(f"all-linear: adapters and the nn.Linear layers outside the vision modules and the LM head differ: "
             f"{sorted(adapted ^ linear)[:3]}")
    if _trainable(backbone) != {name for name, _ in backbone.named_parameters() if "lora_" in name}:
        fail("all-linear: parameters other than the adapters train")
    with torch.no_grad():
        for name, parameter in backbone.named_parameters():
            if "lora_B" in name:  # zero at init; make the adapters matter
                parameter.normal_(std=0.1)
    _compare_after_loading(backbone, random_images(backbone, 2, 1, 1), random_suffix(backbone, 2, 1, 1))
    return f"adapters on {len(adapted)} linear layers outside the vision modules, save / load keep them"


def _names_in(backbone: Backbone, modules: list[torch.nn.Module]) -> set[str]:
    inside = {id(p) for module in modules for p in module.parameters()}
    return {name for name, p in backbone.named_parameters() if id(p) in inside}


def _trainable(backbone: Backbone) -> set[str]:
    return {name for name, p in backbone.named_parameters() if p.requires_grad}


def check_freeze_modes(backbone: Backbone) -> str:
    """Vision and language modules are disjoint and non-empty; each freeze mode leaves exactly its parameters
    trainable (LoRA: adapters on the language model only, so `lora_target_modules` matches), and the suffix
    receives a gradient in every mode."""
    everything = {name for name, _ in backbone.named_parameters()}
    vision, language = _names_in(backbone, backbone.vision_modules()), _names_in(backbone, backbone.language_modules())
    if not vision or not language:
        fail(f"vision_modules() holds {len(vision)} and language_modules() {len(language)} parameters; "
             f"both must hold some")
    if vision & language:
        fail(f"vision and language modules share parameters: {sorted(vision & language)[:3]}")
    embeddings = _names_in(backbone, [backbone.input_embeddings()])
    expected = {"full": everything, "frozen-vision": everything - vision, "frozen-language": everything - language,
                "frozen-vision-and-embeddings": everything - vision - embeddings}
    for mode in FREEZE_MODES:
        backbone.freeze(mode, lora_rank=2)
        trainable = _trainable(backbone)
        if mode == "lora":
            adapters = {name for name in _names_in(backbone, backbone.language_modules()) if "lora_" in name}
            if not adapters:
                fail(f"lora: lora_target_modules {backbone.lora_target_modules!r} matches no module of the "
                     f"language model")
            if trainable != adapters:
                fail(f"lora: trainable parameters other than the language model's adapters, e.g. "
                     f"{sorted(trainable ^ adapters)[:2]}")
        elif trainable != expected[mode]:
            fail(f"{mode}: {len(trainable ^ expected[mode])} parameters wrongly (un)frozen, e.g. "
                 f"{sorted(trainable ^ expected[mode])[:2]}")
        backbone.zero_grad(set_to_none=True)
        suffix = random_suffix(backbone, 2, 2, 1).requires_grad_(True)
        backbone.train()
        hidden = backbone(backbone.preprocess_images(random_images(backbone, 2, 2, 1)), INSTRUCTIONS, suffix,
                          interleaved=True)
        hidden.pow(2).sum().backward()
        if suffix.grad is None or suffix.grad.abs().sum() == 0:
            fail(f"{mode}: no gradient reaches the suffix embeddings")
    return f"{', '.join(FREEZE_MODES)}: the expected parameters train ({len(vision)} vision, {len(language)} " \
        f"language tensors)"


def check_action_tokens(backbone: Backbone) -> str:
    """`reserve_action_tokens`: overwrite takes the last ordinary ids in bin order, never a special one; append
    adds tokens and grows the embeddings and the LM head."""
    special = set(backbone.tokenizer.all_special_ids) | set(backbone.tokenizer.get_added_vocab().values())
    ids = backbone.reserve_action_tokens(256).tolist()
    if len(set(ids)) != 256 or ids != sorted(ids, reverse=True) or special & set(ids):
        fail("overwrite: 256 bins do not take distinct ordinary ids in descending order")
    vocabulary = len(backbone.tokenizer)
    appended = backbone.reserve_action_tokens(8, mode="append")
    if appended.tolist() != list(range(vocabulary, vocabulary + 8)):
        fail(f"append: ids {appended.tolist()} are not the next 8 after the vocabulary of {vocabulary}")
    logits = backbone.lm_logits(backbone.embed_tokens(appended))
    if logits.shape != (8, vocabulary + 8):
        fail(f"append: logits of shape {tuple(logits.shape)}, expected {(8, vocabulary + 8)}: the LM head did "
             f"not grow (resize_vocabulary)")
    return f"overwrite ids {ids[0]}..{ids[-1]}, append ids {vocabulary}..{vocabulary + 7}"


def check_reference_forward(backbone: Backbone) -> str:
    """The hidden state at a suffix embedding equals the wrapped model's own forward on the same image and
    instruction (`Backbone.reference_hidden_state`): same image tokens, positions, token types and masks."""
    backbone.eval()
    image = random_images(backbone, 1, 1, 1)
    suffix = random_suffix(backbone, 1, 1, 1)
    with torch.no_grad():
        expected = backbone.reference_hidden_state(image[0, 0, 0], INSTRUCTIONS[0], suffix[0, 0, 0])
        if expected is None:
            raise SkipCheck("no wrapped transformers forward to compare with (reference_hidden_state gives None)")
        hidden = backbone(backbone.preprocess_images(image), INSTRUCTIONS[:1], suffix)[0, 0, 0]
    if not close(hidden, expected, REFERENCE_TOLERANCE):
        fail(f"the hidden state and the wrapped model's own forward {differ(hidden, expected)}: positions "
             f"(M-RoPE), token types or image tokens differ from the model's")
    return f"agrees with the wrapped model's own forward within {REFERENCE_TOLERANCE:g}"


CHECKS: dict[str, Callable[[Backbone], str]] = {
    "image settings": check_image_settings,
    "forward and gradients": check_forward_and_gradients,
    "suffix causality": check_suffix_causality,
    "frame causality": check_frame_causality,
    "batch independence": check_batch_independence,
    "save and load": check_save_and_load,
    "LoRA save and load": check_lora_save_and_load,
    "LoRA on all linear layers": check_lora_on_all_linear_layers,
    "freeze modes": check_freeze_modes,
    "action tokens": check_action_tokens,
    "wrapped model's forward": check_reference_forward,
}


# ---- running them --------------------------------------------------------------------------------------------


def check_backbone(name: str, **options) -> list[CheckResult]:
    """Every check on tiny `name` built with `options` (a fresh, seeded backbone for each check)."""
    create_backbone(name, **options)  # a plugin that cannot be built is one clear error, not ten failed checks
    results = []
    wrong_width = None  # a forward of the wrong width fails every check that runs one: said once
    for check, function in CHECKS.items():
        torch.manual_seed(0)
        result = run_check(check, function, create_backbone(name, **options))
        if isinstance(result.error, HiddenSizeError):
            if wrong_width:
                result = CheckResult(check, "skip", f"needs a forward of the right width (see {wrong_width!r})")
            else:
                wrong_width = check
        results.append(result)
    return results


def assert_backbone_conforms(name: str, **options) -> list[CheckResult]:
    """For a plugin's test suite: every check passes (or does not apply), else one AssertionError listing the
    failures."""
    results = check_backbone(name, **options)
    failures = [f"{result.check}: {result.reason}" for result in results if not result.passed]
    if failures:
        raise AssertionError(f"backbone {name!r} fails {len(failures)} conformance check(s):\n" + "\n".join(failures))
    return results

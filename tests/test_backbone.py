"""Backbone plugins: the interface every built-in backbone keeps, at its tiny size."""

from types import SimpleNamespace

import pytest
import torch
from transformers.image_utils import SizeDict

from robovlms.backbone import BACKBONES, backbones_table, create_backbone, list_backbones, load_backbone
from robovlms.errors import ConfigError, ShapeError, UnknownNameError

BUILT_IN = ["kosmos2", "paligemma", "flamingo", "gpt-scratch", "film-convnet"]
INSTRUCTIONS = ["press the button from the top", "open the door"]  # different lengths: rows get padded

VISION_PREFIXES = {
    "kosmos2": ("model.vision_model.", "model.image_to_text_projection."),
    "paligemma": ("model.model.vision_tower.", "model.model.multi_modal_projector."),
    "flamingo": ("model.model.vision_model.", "model.model.perceiver_resampler."),
    "gpt-scratch": ("model.image_encoder.",),
    "film-convnet": ("model.image_encoder.",),
}
LANGUAGE_PREFIXES = {
    "kosmos2": ("model.text_model.",),
    "paligemma": ("model.model.language_model.", "model.lm_head."),
    "flamingo": ("model.model.embed_tokens.", "model.model.layers.", "model.model.norm.", "model.lm_head."),
    "gpt-scratch": ("model.wte.", "model.wpe.", "model.blocks.", "model.ln_f.", "model.lm_head."),
    "film-convnet": ("model.wte.", "model.wpe.", "model.blocks.", "model.ln_f.", "model.lm_head."),
}


def random_images(backbone, batch, frames, views, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, frames, views, 64, 64, 3), dtype=torch.uint8, generator=generator)
    return backbone.preprocess_images(images)


def lrn_token(backbone, batch, frames):
    lrn = torch.nn.Parameter(torch.randn(backbone.hidden_size) * 0.02)
    return lrn, lrn.view(1, 1, 1, -1).expand(batch, frames, 1, -1)


@pytest.fixture(params=BUILT_IN)
def backbone(request):
    torch.manual_seed(0)
    return create_backbone(request.param)


@pytest.mark.parametrize("frames, views", [(1, 1), (3, 2)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_forward_and_backward_reach_the_lrn_embedding(backbone, frames, views, interleaved):
    pixel_values = random_images(backbone, 2, frames, views)
    lrn, suffix = lrn_token(backbone, 2, frames)
    hidden = backbone(pixel_values, INSTRUCTIONS, suffix, interleaved=interleaved)
    assert hidden.shape == (2, frames, 1, backbone.hidden_size)
    hidden.pow(2).sum().backward()
    assert lrn.grad is not None and lrn.grad.abs().sum() > 0
    vision_grads = [p.grad for p in backbone.vision_modules()[0].parameters() if p.grad is not None]
    assert vision_grads and any(g.abs().sum() > 0 for g in vision_grads)  # the images reach the output


@pytest.mark.parametrize("instruction_per_frame", [False, True])
def test_interleaved_hidden_state_sees_only_frames_up_to_its_own(backbone, instruction_per_frame):
    backbone.eval()
    pixel_values = random_images(backbone, 2, 3, 1)
    _, suffix = lrn_token(backbone, 2, 3)
    changed = pixel_values.clone()
    changed[:, 2] = random_images(backbone, 2, 1, 1, seed=1)[:, 0]
    with torch.no_grad():
        before = backbone(pixel_values, INSTRUCTIONS, suffix, interleaved=True,
                          instruction_per_frame=instruction_per_frame)
        after = backbone(changed, INSTRUCTIONS, suffix, interleaved=True, instruction_per_frame=instruction_per_frame)
    assert torch.equal(before[:, :2], after[:, :2])
    assert not torch.allclose(before[:, 2], after[:, 2])


def test_an_interleaved_context_can_state_the_instruction_before_every_frame(backbone):
    """RoboVLMs' interleaved layout: <s> (instruction, frame t's images, suffix t) for each t."""
    once = backbone.build_context(INSTRUCTIONS[:1], 3, 2, 1, interleaved=True)
    per_frame = backbone.build_context(INSTRUCTIONS[:1], 3, 2, 1, interleaved=True, instruction_per_frame=True)
    instruction = backbone.tokenizer(INSTRUCTIONS[0], add_special_tokens=False)["input_ids"]
    assert per_frame.input_ids.shape[1] == once.input_ids.shape[1] + 2 * len(instruction)
    text = per_frame.input_ids[0][~per_frame.image_slots[0] & ~per_frame.suffix_slots[0]].tolist()
    assert text.count(instruction[0]) >= 3 * instruction.count(instruction[0])
    assert torch.equal(per_frame.image_slots.sum(), once.image_slots.sum())


def test_per_frame_contexts_see_only_their_own_frame(backbone):
    backbone.eval()
    pixel_values = random_images(backbone, 2, 3, 1)
    _, suffix = lrn_token(backbone, 2, 3)
    changed = pixel_values.clone()
    changed[:, 0] = random_images(backbone, 2, 1, 1, seed=1)[:, 0]
    with torch.no_grad():
        before = backbone(pixel_values, INSTRUCTIONS, suffix)
        after = backbone(changed, INSTRUCTIONS, suffix)
    assert torch.equal(before[:, 1:], after[:, 1:])
    assert not torch.allclose(before[:, 0], after[:, 0])


@pytest.mark.parametrize("interleaved", [False, True])
def test_padding_in_a_batch_does_not_change_a_sample(backbone, interleaved):
    backbone.eval()
    pixel_values = random_images(backbone, 2, 2, 1)
    _, suffix = lrn_token(backbone, 2, 2)
    with torch.no_grad():
        batched = backbone(pixel_values, INSTRUCTIONS, suffix, interleaved=interleaved)
        alone = backbone(pixel_values[1:], INSTRUCTIONS[1:], suffix[1:], interleaved=interleaved)
    torch.testing.assert_close(batched[1:], alone, atol=1e-5, rtol=1e-5)


def reference_context_ids(backbone, name, instruction):
    """The documented per-frame layout, <s> [image block] instruction, spelled out by hand per backbone."""
    tokenizer = backbone.tokenizer
    slot = tokenizer.pad_token_id
    if name == "kosmos2":
        image = ["<image>"], backbone.model.config.latent_query_num, ["</image>"]
    elif name == "paligemma":
        image, slot = ([], backbone.model.config.text_config.num_image_tokens, []), backbone.model.config.image_token_id
    elif name == "flamingo":
        image = ["<fake_token_around_image>", "<image>", "<fake_token_around_image>"], 0, []
    elif name == "film-convnet":
        image = [], backbone.model.config.image_tokens, []
    else:
        image = [], (backbone.image_size // 16) ** 2, []
    before, slots, after = image
    ids = ([tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(before) + [slot] * slots
           + tokenizer.convert_tokens_to_ids(after) + tokenizer(instruction, add_special_tokens=False)["input_ids"])
    image_mask = [0] * (1 + len(before)) + [1] * slots + [0] * (len(ids) - 1 - len(before) - slots)
    return torch.tensor([ids]), torch.tensor([image_mask])


def reference_lrn_hidden(backbone, name, pixel_values, instruction, lrn):
    """Hidden state and logits at an [LRN] appended to inputs_embeds, from the wrapped model's own forward."""
    ids, image_mask = reference_context_ids(backbone, name, instruction)
    embeds = torch.cat([backbone.model.wte(ids) if name in ("gpt-scratch", "film-convnet")
                        else backbone.model.get_input_embeddings()(ids), lrn.view(1, 1, -1)], dim=1)
    image_mask = torch.cat([image_mask, torch.zeros(1, 1, dtype=torch.long)], dim=1)
    model = backbone.model
    if name == "kosmos2":
        out = model(pixel_values=pixel_values, inputs_embeds=embeds, image_embeds_position_mask=image_mask,
                    output_hidden_states=True)
    elif name == "paligemma":
        token_type_ids = torch.zeros_like(image_mask)
        token_type_ids[0, -1] = 1
        out = model(pixel_values=pixel_values, inputs_embeds=embeds, token_type_ids=token_type_ids,
                    output_hidden_states=True)
    elif name == "flamingo":
        image_attention_mask = torch.ones(1, embeds.shape[1], 1, dtype=torch.long)
        image_attention_mask[0, 0] = 0  # <s> comes before the image
        out = model(pixel_values=pixel_values.unsqueeze(1), inputs_embeds=embeds,
                    image_attention_mask=image_attention_mask, output_hidden_states=True)
    elif name == "film-convnet":  # each conv layer modulated by the mean embedding of <s> and the instruction
        instruction = embeds[0, :-1][image_mask[0, :-1] == 0].mean(0, keepdim=True)
        embeds = embeds.masked_scatter(image_mask.bool().unsqueeze(-1), model.image_encoder(pixel_values, instruction))
        hidden = model(embeds)
        return hidden[0, -1], model.lm_head(hidden)[0, -1]
    else:
        embeds = embeds.masked_scatter(image_mask.bool().unsqueeze(-1), model.image_encoder(pixel_values))
        hidden = model(embeds)
        return hidden[0, -1], model.lm_head(hidden)[0, -1]
    return out.hidden_states[-1][0, -1], out.logits[0, -1]


@pytest.mark.parametrize("name", BUILT_IN)
def test_hidden_state_at_lrn_equals_the_wrapped_models_own_forward(name):
    torch.manual_seed(0)
    backbone = create_backbone(name).eval()
    if name == "film-convnet":  # FiLM starts as the identity: make the instruction matter
        with torch.no_grad():
            for film in backbone.model.image_encoder.films:
                film.weight.normal_(std=0.5)
    pixel_values = random_images(backbone, 1, 1, 1)
    lrn, suffix = lrn_token(backbone, 1, 1)
    with torch.no_grad():
        hidden = backbone(pixel_values, INSTRUCTIONS[:1], suffix)[0, 0, 0]
        expected_hidden, expected_logits = reference_lrn_hidden(backbone, name, pixel_values[0, 0], INSTRUCTIONS[0],
                                                                lrn)
        torch.testing.assert_close(hidden, expected_hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(backbone.lm_logits(hidden), expected_logits, atol=1e-5, rtol=1e-5)


def test_save_and_load_rebuild_identical_outputs(backbone, tmp_path):
    with torch.no_grad():
        for parameter in backbone.parameters():  # as if trained: nothing left at its initial value
            parameter.add_(torch.randn_like(parameter) * 0.05)
    action_ids = backbone.reserve_action_tokens(4, mode="append")
    backbone.freeze("frozen-vision")
    backbone.save(tmp_path / "backbone")
    loaded = load_backbone(tmp_path / "backbone")
    backbone.eval(), loaded.eval()
    pixel_values = random_images(backbone, 2, 2, 2)
    suffix = backbone.embed_tokens(action_ids[:2]).view(1, 1, 2, -1).expand(2, 2, 2, -1)
    with torch.no_grad():
        for interleaved in (False, True):
            assert torch.equal(backbone(pixel_values, INSTRUCTIONS, suffix, interleaved),
                               loaded(pixel_values, INSTRUCTIONS, suffix, interleaved))
    assert loaded.label == backbone.label and loaded.random_init
    assert len(loaded.tokenizer) == len(backbone.tokenizer)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
        [n for n, p in backbone.named_parameters() if p.requires_grad]


def lora_layers(backbone):
    from peft.tuners.lora import LoraLayer

    return [module for module in backbone.modules() if isinstance(module, LoraLayer)]


def test_lora_alpha_and_dropout_reach_the_adapters_and_survive_save_and_load(tmp_path):
    """RoboVLMs' LoRA: rank 64, alpha 16 (a scale of 0.25), dropout 0.05; by default alpha is the rank, no dropout."""
    backbone = create_backbone("kosmos2")
    backbone.freeze("lora", lora_rank=64, lora_alpha=16, lora_dropout=0.05)
    backbone.save(tmp_path / "backbone")
    for adapted in (backbone, load_backbone(tmp_path / "backbone")):
        assert lora_layers(adapted)
        for layer in lora_layers(adapted):
            assert layer.scaling["default"] == 0.25
            assert layer.lora_dropout["default"].p == 0.05
    plain = create_backbone("kosmos2")
    plain.freeze("lora", lora_rank=8)
    assert {layer.scaling["default"] for layer in lora_layers(plain)} == {1.0}
    assert all(isinstance(layer.lora_dropout["default"], torch.nn.Identity) for layer in lora_layers(plain))
    with pytest.raises(ConfigError, match=r"rank 8 on attention \(alpha 8, dropout 0.0\), not rank 8 on attention \(alpha 16"):
        plain.freeze("lora", lora_rank=8, lora_alpha=16)


def test_save_and_load_keep_lora_adapters(backbone, tmp_path):
    backbone.freeze("lora", lora_rank=4)
    with torch.no_grad():
        for name, parameter in backbone.named_parameters():
            if "lora_B" in name:  # zero at init; make the adapters matter
                parameter.normal_(std=0.1)
    backbone.save(tmp_path / "backbone")
    loaded = load_backbone(tmp_path / "backbone")
    backbone.eval(), loaded.eval()
    pixel_values = random_images(backbone, 2, 1, 1)
    _, suffix = lrn_token(backbone, 2, 1)
    with torch.no_grad():
        assert torch.equal(backbone(pixel_values, INSTRUCTIONS, suffix), loaded(pixel_values, INSTRUCTIONS, suffix))
    assert loaded.freeze_mode == "lora" and loaded.lora_rank == 4


def trainable(backbone):
    return {name for name, p in backbone.named_parameters() if p.requires_grad}


def test_freeze_modes_leave_exactly_the_expected_parameters_trainable(backbone):
    name = backbone.name
    everything = {n for n, _ in backbone.named_parameters()}
    vision = {n for n in everything if n.startswith(VISION_PREFIXES[name])}
    language = {n for n in everything if n.startswith(LANGUAGE_PREFIXES[name])}
    assert vision and language and not vision & language

    backbone.freeze("full")
    assert trainable(backbone) == everything
    backbone.freeze("frozen-vision")
    assert trainable(backbone) == everything - vision
    backbone.freeze("frozen-language")
    assert trainable(backbone) == everything - language
    backbone.freeze("lora", lora_rank=2)
    lora = trainable(backbone)
    assert lora and all("lora_" in n and n.startswith(LANGUAGE_PREFIXES[name]) and "attn" in n for n in lora)
    assert lora == {n for n, _ in backbone.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("mode", ["full", "frozen-vision", "frozen-language", "frozen-vision-and-embeddings",
                                  "lora"])
def test_lrn_receives_gradient_in_every_freeze_mode(backbone, mode):
    backbone.freeze(mode)
    lrn, suffix = lrn_token(backbone, 2, 2)
    backbone(random_images(backbone, 2, 2, 1), INSTRUCTIONS, suffix, interleaved=True).pow(2).sum().backward()
    assert lrn.grad.abs().sum() > 0


def test_unknown_freeze_mode_lists_the_modes(backbone):
    with pytest.raises(UnknownNameError,
                       match="frozen-language, frozen-vision, frozen-vision-and-embeddings, full, lora"):
        backbone.freeze("half")


def test_frozen_vision_and_embeddings_trains_everything_but_the_vision_tower_and_the_word_embeddings(backbone):
    everything = {n for n, _ in backbone.named_parameters()}
    vision = {n for n in everything if n.startswith(VISION_PREFIXES[backbone.name])}
    embedding = {n for n, p in backbone.named_parameters() if p is backbone.input_embeddings().weight}
    backbone.freeze("frozen-vision-and-embeddings")
    assert embedding and trainable(backbone) == everything - vision - embedding
    lrn, suffix = lrn_token(backbone, 2, 2)
    backbone(random_images(backbone, 2, 2, 1), INSTRUCTIONS, suffix, interleaved=True).pow(2).sum().backward()
    assert backbone.input_embeddings().weight.grad is None
    assert all(p.grad is None for n, p in backbone.named_parameters() if n in vision)
    assert lrn.grad.abs().sum() > 0


def test_frozen_vision_and_embeddings_trains_only_the_action_token_rows_of_the_word_embeddings(backbone):
    action_ids = backbone.reserve_action_tokens(4, mode="append")
    backbone.freeze("frozen-vision-and-embeddings")
    weight = backbone.input_embeddings().weight
    assert backbone.partly_frozen_parameters() == [weight]
    suffix = backbone.embed_tokens(action_ids[:2]).view(1, 1, 2, -1).expand(2, 1, 2, -1)
    hidden = backbone(random_images(backbone, 2, 1, 1), INSTRUCTIONS, suffix)
    backbone.lm_logits(hidden)[..., action_ids].logsumexp(-1).sum().backward()
    rows_with_gradient = set(weight.grad.abs().sum(-1).nonzero().flatten().tolist())
    assert rows_with_gradient and rows_with_gradient <= set(action_ids.tolist())
    backbone.freeze("full")  # the row mask goes with the mode
    assert backbone.partly_frozen_parameters() == []


def test_all_linear_lora_adapts_every_linear_layer_of_the_language_model_and_no_vision_layer(backbone):
    backbone.freeze("lora", lora_rank=2, lora_targets="all-linear")
    adapted = {n for n, m in backbone.model.named_modules() if hasattr(m, "lora_A")}
    vision = VISION_PREFIXES[backbone.name]
    linear = {n.removeprefix("model.").removesuffix(".base_layer") for n, m in backbone.named_modules()
              if isinstance(m, torch.nn.Linear) and ".lora_" not in n and not n.startswith(vision)
              and m is not backbone.output_embeddings()}
    assert adapted == linear and any("mlp" in n or "fc" in n or "ffn" in n for n in adapted)
    assert trainable(backbone) == {n for n, _ in backbone.named_parameters() if "lora_" in n}
    assert backbone.lora_targets == "all-linear"


def test_lora_targets_are_checked_and_cannot_change_once_adapters_exist(backbone):
    with pytest.raises(UnknownNameError, match="LoRA targets 'mlp'; valid choices: all-linear, attention"):
        backbone.freeze("lora", lora_targets="mlp")
    backbone.freeze("lora", lora_rank=2)
    with pytest.raises(ConfigError, match=r"LoRA adapters of rank 2 on attention \(alpha 2, dropout 0.0\), not rank 2 on all-linear"):
        backbone.freeze("lora", lora_rank=2, lora_targets="all-linear")


def test_save_and_load_keep_all_linear_lora_and_the_trainable_action_token_rows(backbone, tmp_path):
    backbone.reserve_action_tokens(4, mode="append")
    backbone.freeze("frozen-vision-and-embeddings")
    backbone.save(tmp_path / "rows")
    loaded = load_backbone(tmp_path / "rows")
    assert loaded.freeze_mode == "frozen-vision-and-embeddings" and trainable(loaded) == trainable(backbone)
    assert loaded.partly_frozen_parameters() and torch.equal(loaded.action_token_ids, backbone.action_token_ids)

    torch.manual_seed(0)
    adapted = create_backbone(backbone.name)
    adapted.freeze("lora", lora_rank=2, lora_targets="all-linear")
    adapted.save(tmp_path / "lora")
    loaded = load_backbone(tmp_path / "lora")
    assert (loaded.lora_rank, loaded.lora_targets) == (2, "all-linear") and trainable(loaded) == trainable(adapted)


def test_overwrite_reserves_the_last_ordinary_ids_in_bin_order(backbone):
    ids = backbone.reserve_action_tokens(256)
    special = set(backbone.tokenizer.all_special_ids) | set(backbone.tokenizer.get_added_vocab().values())
    assert ids.tolist() == sorted(ids.tolist(), reverse=True) and len(set(ids.tolist())) == 256
    assert ids[0] == max(i for i in range(backbone.tokenizer.vocab_size) if i not in special)
    assert not special & set(ids.tolist())
    assert backbone.lm_logits(backbone.embed_tokens(ids)).shape[-1] == backbone.input_embeddings().num_embeddings


def test_append_adds_tokens_and_grows_embeddings_and_lm_head(backbone):
    vocabulary = len(backbone.tokenizer)
    ids = backbone.reserve_action_tokens(8, mode="append")
    assert ids.tolist() == list(range(vocabulary, vocabulary + 8))
    assert len(backbone.tokenizer) == vocabulary + 8
    assert backbone.tokenizer.convert_ids_to_tokens(ids.tolist()) == [f"<action_{i}>" for i in range(8)]
    logits = backbone.lm_logits(backbone.embed_tokens(ids))
    assert logits.shape == (8, vocabulary + 8)


def test_appended_action_tokens_start_as_distinct_rows_of_the_embeddings_and_the_lm_head(backbone):
    """Each bin its own token from the first step: not the old rows' mean, which would give every bin the same
    logit and, decoded one by one, the same input."""
    ids = backbone.reserve_action_tokens(16, mode="append")
    words = backbone.input_embeddings().weight[:ids.min()].detach().std(dim=0).mean().item()
    for rows in (backbone.embed_tokens(ids).detach(), backbone.output_embeddings().weight[ids].detach()):
        spread = rows.std(dim=0).mean().item()  # across the action tokens
        assert spread > 0.1 * words, f"action tokens differ by {spread:.2g}, words by {words:.2g}"


def test_appending_action_tokens_prints_no_notice_from_transformers(monkeypatch):
    from transformers import modeling_utils

    notices = []
    monkeypatch.setattr(modeling_utils.logger, "warning_once", notices.append)
    create_backbone("paligemma").reserve_action_tokens(8, mode="append")
    assert notices == []


def test_appending_action_tokens_a_tokenizer_already_holds_keeps_their_ids(backbone, tmp_path):
    """A backbone rebuilt from a trained run's files reserves the same tokens again without growing."""
    ids = backbone.reserve_action_tokens(8, mode="append")
    backbone.save(tmp_path / "backbone")
    rebuilt = load_backbone(tmp_path / "backbone")
    size = rebuilt.input_embeddings().num_embeddings
    assert rebuilt.reserve_action_tokens(8, mode="append").tolist() == ids.tolist()
    assert rebuilt.input_embeddings().num_embeddings == size == len(rebuilt.tokenizer)


def test_preprocess_matches_the_image_processor_at_native_size():
    backbone = create_backbone("kosmos2")
    images = torch.randint(0, 256, (1, 1, 1, 64, 64, 3), dtype=torch.uint8)
    expected = backbone.processor.image_processor(images=[images[0, 0, 0].numpy()], return_tensors="pt").pixel_values
    torch.testing.assert_close(backbone.preprocess_images(images)[0, 0], expected, atol=1e-5, rtol=1e-5)


def test_preprocess_resizes_to_the_backbone_image_size(backbone):
    images = torch.randint(0, 256, (2, 3, 2, 96, 128, 3), dtype=torch.uint8)
    assert backbone.preprocess_images(images).shape == (2, 3, 2, 3, backbone.image_size, backbone.image_size)


def test_preprocess_names_the_expected_shape_for_a_wrong_one(backbone):
    with pytest.raises(ShapeError, match=r"\(batch, time, views, height, width, 3\)"):
        backbone.preprocess_images(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))


def test_forward_names_the_expected_shape_for_wrong_images(backbone):
    _, suffix = lrn_token(backbone, 2, 1)
    with pytest.raises(ShapeError, match=r"\(batch, time, views, 3, 64, 64\)"):
        backbone(torch.zeros(2, 1, 3, 64, 64), INSTRUCTIONS, suffix)


def test_unknown_backbone_lists_the_registered_ones():
    with pytest.raises(UnknownNameError, match="flamingo, gpt-scratch, kosmos2"):
        create_backbone("kosmos3")


def test_unknown_tiny_option_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="hidden_size"):
        create_backbone("kosmos2", hidden_dim=32)


def test_tiny_options_override_the_config():
    backbone = create_backbone("paligemma", hidden_size=32, layers=1, heads=2, image_size=32, patch_size=8)
    assert backbone.hidden_size == 32 and backbone.image_size == 32
    _, suffix = lrn_token(backbone, 1, 1)
    images = torch.randint(0, 256, (1, 1, 1, 32, 32, 3), dtype=torch.uint8)
    assert backbone(backbone.preprocess_images(images), INSTRUCTIONS[:1], suffix).shape == (1, 1, 1, 32)


@pytest.mark.parametrize("name", ["kosmos2", "paligemma", "flamingo"])
def test_pretrained_loads_a_local_transformers_directory(name, tmp_path):
    source = create_backbone(name).eval()
    source.model.save_pretrained(tmp_path / name)
    source.processor.save_pretrained(tmp_path / name)
    pretrained = create_backbone(name, "pretrained", path=str(tmp_path / name)).eval()
    assert not pretrained.random_init and pretrained.label == f"{name} (pretrained: {tmp_path / name})"
    pixel_values = random_images(source, 2, 1, 1)
    _, suffix = lrn_token(source, 2, 1)
    with torch.no_grad():
        assert torch.equal(source(pixel_values, INSTRUCTIONS, suffix), pretrained(pixel_values, INSTRUCTIONS, suffix))


def test_pretrained_resolves_a_model_id_in_the_local_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    source = create_backbone("kosmos2")
    snapshot = tmp_path / "models--acme--tiny-kosmos2" / "snapshots" / ("0" * 40)
    source.model.save_pretrained(snapshot)
    source.processor.save_pretrained(snapshot)
    (tmp_path / "models--acme--tiny-kosmos2" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-kosmos2" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert create_backbone("kosmos2", "pretrained", path="acme/tiny-kosmos2").label == \
        "kosmos2 (pretrained: acme/tiny-kosmos2)"


def test_pretrained_gpt_scratch_loads_a_saved_one(tmp_path):
    source = create_backbone("gpt-scratch")
    source.save(tmp_path / "gpt")
    assert create_backbone("gpt-scratch", "pretrained", path=str(tmp_path / "gpt")).label == \
        f"gpt-scratch (pretrained: {tmp_path / 'gpt'})"


def test_pretrained_without_a_path_says_what_it_needs():
    with pytest.raises(ConfigError, match="needs path="):
        create_backbone("kosmos2", "pretrained")


def test_pretrained_path_that_does_not_exist_fails_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        create_backbone("paligemma", "pretrained", path=str(tmp_path / "missing"))


def test_pretrained_path_of_another_architecture_names_both(tmp_path):
    source = create_backbone("paligemma")
    source.model.config.save_pretrained(tmp_path / "paligemma")  # config.json alone: no weights are read
    with pytest.raises(ConfigError, match="a 'paligemma' model; backbone 'kosmos2' needs a model of type kosmos-2"):
        create_backbone("kosmos2", "pretrained", path=str(tmp_path / "paligemma"))


def test_load_of_a_directory_without_a_saved_backbone_says_so(tmp_path):
    with pytest.raises(ConfigError, match="backbone.json"):
        load_backbone(tmp_path)


def test_labels_mark_random_init():
    assert create_backbone("kosmos2").label == "kosmos2 (tiny, random init)"


def test_list_backbones_with_parameters_gives_each_built_in_with_a_small_parameter_count():
    rows = list_backbones(parameters=True)
    counts = {row["name"]: row.get("tiny_parameters") for row in rows}
    assert set(BUILT_IN) <= set(counts) <= set(BACKBONES.names())
    for name in BUILT_IN:
        assert 200_000 <= counts[name] <= 1_000_000
    assert backbones_table(rows).row_count == len(rows)


def test_tiny_build_is_deterministic_given_the_seed():
    torch.manual_seed(1)
    first = create_backbone("flamingo")
    torch.manual_seed(1)
    second = create_backbone("flamingo")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()


def processor_with_shortest_edge(backbone, shortest_edge):
    """The backbone's processor, its image processor's size a pixel count as Qwen2-VL's is."""
    from transformers import CLIPImageProcessorPil, Kosmos2Processor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": shortest_edge}, do_center_crop=False)
    return Kosmos2Processor(image_processor, backbone.tokenizer)


def test_an_image_processor_size_that_is_not_the_vision_configs_image_size_is_refused():
    from robovlms.backbones.kosmos2 import Kosmos2Backbone

    backbone = create_backbone("kosmos2")
    with pytest.raises(ConfigError, match="image size from its image processor's size 4096 differs from its vision "
                                          "config's image_size 64; pass image_size="):
        Kosmos2Backbone(backbone.model, processor_with_shortest_edge(backbone, 4096), "tiny", None)


def test_a_backbone_declares_its_image_size_when_the_processors_size_is_a_pixel_count():
    from robovlms.backbones.kosmos2 import Kosmos2Backbone

    backbone = create_backbone("kosmos2")
    declared = Kosmos2Backbone(backbone.model, processor_with_shortest_edge(backbone, 4096), "tiny", None,
                               image_size=64)
    assert declared.image_size == 64


def idefics3_processor(backbone, tile_side):
    """The backbone's tokenizer beside an Idefics3 (SmolVLM) image processor, sized by `longest_edge`: images are
    resized to 4 tiles a side and cut into tiles of `tile_side`, the side the vision tower takes."""
    from transformers import Idefics3ImageProcessorPil

    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 4 * tile_side},
                                                max_image_size={"longest_edge": tile_side})
    return SimpleNamespace(image_processor=image_processor, tokenizer=backbone.tokenizer)


def test_an_image_processor_sized_by_longest_edge_gives_the_side_of_its_tiles():
    from robovlms.backbones.kosmos2 import Kosmos2Backbone

    backbone = create_backbone("kosmos2")
    assert Kosmos2Backbone(backbone.model, idefics3_processor(backbone, 64), "tiny", None).image_size == 64


def test_a_declared_image_size_is_used_whatever_the_image_processors_size():
    from robovlms.backbones.kosmos2 import Kosmos2Backbone

    backbone = create_backbone("kosmos2")
    processor = idefics3_processor(backbone, 364)
    assert Kosmos2Backbone(backbone.model, processor, "tiny", None, image_size=64).image_size == 64


def test_an_image_processor_size_naming_no_side_asks_for_a_declared_image_size():
    from robovlms.backbones.kosmos2 import Kosmos2Backbone

    backbone = create_backbone("kosmos2")
    processor = idefics3_processor(backbone, 64)
    processor.image_processor.max_image_size = None
    processor.image_processor.size = SizeDict(max_pixels=64 * 64)
    with pytest.raises(ConfigError, match=r"backbone 'kosmos2': its image processor's size \{'max_pixels': 4096\} "
                                          r"names no image side; pass image_size="):
        Kosmos2Backbone(backbone.model, processor, "tiny", None)


def test_an_image_size_that_is_no_image_side_is_refused():
    with pytest.raises(ConfigError, match="image_size 4096 is not the side of a square image \\(8 to 2048 px\\)"):
        create_backbone("gpt-scratch", image_size=4096)


def image_variation_against_word_embeddings(backbone) -> float:
    """How much the tiny KOSMOS-2's image tokens vary from image to image, against the word embeddings' scale."""
    torch.manual_seed(0)
    images = torch.rand(8, 3, 64, 64) * 2 - 1
    image_tokens = backbone.encode_images(images)
    words = backbone.model.text_model.model.embed_tokens.weight
    return (image_tokens.std(dim=0).mean() / words.pow(2).mean().sqrt()).item()


def test_tiny_kosmos2_image_tokens_vary_with_the_image_at_the_word_embeddings_scale_only_at_a_width_scaled_std():
    """At KOSMOS-2's own init std (0.02, for its 2048-wide model; the tiny default) the 64-wide resampler passes
    almost nothing of the image on; at 1/sqrt(hidden) it does (docs/demo.md: not better on validation)."""
    torch.manual_seed(0)
    assert image_variation_against_word_embeddings(create_backbone("kosmos2")) < 0.01
    torch.manual_seed(0)
    assert image_variation_against_word_embeddings(create_backbone("kosmos2", init_std=64 ** -0.5)) > 0.05


def saved_tensor_bytes_and_gradients(formulation, batch):
    """The bytes autograd keeps for backward (each storage once) in a training step, and the gradients it gives."""
    saved = {}

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss, _ = formulation.train().loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    return sum(saved.values()), {name: p.grad for name, p in formulation.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", BUILT_IN)
def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(name):
    import copy

    from robovlms.data.store import Statistics
    from robovlms.formulation import create_formulation

    statistics = Statistics(p01=[-1.0] * 4, p99=[1.0] * 4, mean=[0.0] * 4, std=[1.0] * 4, min=[-1.0] * 4,
                            max=[1.0] * 4)
    torch.manual_seed(0)
    plain = create_formulation("policy-head", create_backbone(name, hidden_size=32, layers=2), statistics, statistics,
                               history=2, chunk=2, use_state=True)
    checkpointed = copy.deepcopy(plain)
    checkpointed.backbone.enable_gradient_checkpointing()
    generator = torch.Generator().manual_seed(1)
    batch = {"images": torch.randint(0, 256, (4, 2, 1, 64, 64, 3), dtype=torch.uint8, generator=generator),
             "state": torch.randn(4, 2, 4, generator=generator), "actions": torch.rand(4, 2, 2, 4, generator=generator),
             "action_mask": torch.ones(4, 2, 2, dtype=torch.bool), "instruction": INSTRUCTIONS * 2}
    plain_bytes, plain_gradients = saved_tensor_bytes_and_gradients(plain, batch)
    checkpointed_bytes, checkpointed_gradients = saved_tensor_bytes_and_gradients(checkpointed, batch)
    assert plain_gradients.keys() == checkpointed_gradients.keys()
    for key, gradient in plain_gradients.items():
        torch.testing.assert_close(checkpointed_gradients[key], gradient, rtol=1e-5, atol=1e-7)
    assert checkpointed_bytes < plain_bytes


def test_gradient_checkpointing_on_a_backbone_without_it_is_refused_before_training(tmp_path):
    from robovlms.backbones.gpt_scratch import GPTScratchBackbone
    from robovlms.training import check_training, load_config

    class NoCheckpointing(GPTScratchBackbone):
        name = "no-checkpointing"

        @classmethod
        def supports_gradient_checkpointing(cls) -> bool:
            return False

    BACKBONES.register("no-checkpointing")(NoCheckpointing)
    try:
        config = load_config({"store": "-", "run_dir": "-", "backbone": {"name": "no-checkpointing"},
                              "gradient_checkpointing": True})
        with pytest.raises(ConfigError, match="backbone 'no-checkpointing' does not support gradient_checkpointing"):
            check_training(config)
    finally:
        del BACKBONES._registered["no-checkpointing"]


# A weight that each backbone initialises at its init_std: a projection of its decoder (the CLIP and SigLIP towers'
# own rules scale with width).
INIT_STD_WEIGHTS = {
    "kosmos2": "model.text_model.model.layers.0.self_attn.k_proj.weight",
    "paligemma": "model.model.language_model.layers.0.self_attn.k_proj.weight",
    "flamingo": "model.model.layers.0.self_attn.k_proj.weight",
    "gpt-scratch": "model.blocks.0.attn.qkv.weight",
    "film-convnet": "model.blocks.0.attn.qkv.weight",
}


def initial_weight_std(name: str, **options) -> float:
    torch.manual_seed(0)
    backbone = create_backbone(name, **options)
    return dict(backbone.named_parameters())[INIT_STD_WEIGHTS[name]].std().item()


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("init_std", [0.02, 0.125])
def test_every_backbone_initialises_its_weights_at_the_init_std_it_is_given(name, init_std):
    assert initial_weight_std(name, init_std=init_std) == pytest.approx(init_std, rel=0.1)


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("init_std", [0, -0.02, "wide"])
def test_every_backbone_refuses_an_init_std_that_is_not_a_positive_number(name, init_std):
    with pytest.raises(ConfigError, match=f"backbone '{name}' option init_std: .*got {init_std!r}"):
        create_backbone(name, init_std=init_std)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_backbone_starts_at_the_same_init_std_its_released_models_use(name):
    """One rule for all (docs/demo.md): 0.02, the std of KOSMOS-2, IDEFICS, Gemma and nanoGPT; 1/sqrt(hidden) was not
    resolved better on the validation episodes."""
    assert initial_weight_std(name) == pytest.approx(0.02, rel=0.1)

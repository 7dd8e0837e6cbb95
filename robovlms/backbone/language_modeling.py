"""The token rows of a language-modelling batch: one image, a prompt and the target text the loss is on.

    <s> [image block] prompt target </s>

the policy's per-frame layout (context.py) with the target text in the place of the [LRN] suffix, so that what a
backbone learns in pre-training sits where the policy later reads it. Labels are the target's ids and </s>, -100
(ignored by transformers' losses) everywhere else: the prompt conditions, as an instruction does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

IGNORED = -100  # transformers' ignore_index: no loss at this position


@dataclass
class LanguageModelingRows:
    input_ids: torch.Tensor  # (N, L), image slots hold `slot_id`, right padding the pad id
    attention_mask: torch.Tensor  # (N, L), 0 on right padding
    labels: torch.Tensor  # (N, L), IGNORED except on the target and </s>
    image_slots: torch.Tensor  # (N, L) bool
    in_target: torch.Tensor  # (N, L) bool: the target, </s> and the padding after them (PaliGemma's suffix)


def language_modeling_rows(tokenizer, image_block: tuple[list[int], int, list[int]], prompts: list[str],
                           targets: list[str], slot_id: int | None = None) -> LanguageModelingRows:
    """Rows `<s> [image block] prompt target </s>`, right-padded; `slot_id` fills the image slots (the pad id by
    default, for backbones that put image tokens in by mask)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts for {len(targets)} targets")
    before, slots, after = image_block
    slot = tokenizer.pad_token_id if slot_id is None else slot_id
    head = [tokenizer.bos_token_id, *before, *[slot] * slots, *after]
    rows, labels, images, targeted = [], [], [], []
    for prompt, target in zip(prompts, targets):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = [*tokenizer(target, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        conditioning = len(head) + len(prompt_ids)
        rows.append(torch.tensor(head + prompt_ids + target_ids))
        labels.append(torch.tensor([IGNORED] * conditioning + target_ids))
        image = torch.zeros(len(rows[-1]), dtype=torch.bool)
        image[1 + len(before):1 + len(before) + slots] = True
        images.append(image)
        targeted.append(torch.arange(len(rows[-1])) >= conditioning)
    input_ids = pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)
    attention_mask = pad_sequence([torch.ones(len(row), dtype=torch.long) for row in rows], batch_first=True)
    return LanguageModelingRows(
        input_ids=input_ids, attention_mask=attention_mask,
        labels=pad_sequence(labels, batch_first=True, padding_value=IGNORED),
        image_slots=pad_sequence(images, batch_first=True, padding_value=False),
        in_target=pad_sequence(targeted, batch_first=True, padding_value=True))

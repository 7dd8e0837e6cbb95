"""The token layout of a batch of contexts: where the images, the instruction and the suffix embeddings go.

    per frame (interleaved=False), one row per (sample, frame):
        <s> [image block of view 1] ... [image block of view V] instruction [suffix_t]
    interleaved (interleaved=True), one causal row per sample:
        <s> instruction [image blocks of frame 1] [suffix_1] ... [image blocks of frame T] [suffix_T]
    or, with instruction_per_frame (RoboVLMs' interleaved layout), the instruction before each frame's images.

An image block is a backbone's own framing of one image (`Backbone.image_block()`: token ids before it, a number of
slots that receive its image tokens, token ids after it). Rows are right-padded, so padding never shifts a position.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.nn.utils.rnn import pad_sequence

PAD, TEXT, IMAGE, SUFFIX = 0, 1, 2, 3  # what a context position holds


@dataclass
class Context:
    """Token layout of a batch of contexts. Image and suffix slots hold the pad id until filled."""

    input_ids: torch.Tensor  # (R, L)
    attention_mask: torch.Tensor  # (R, L), 0 on right padding
    image_slots: torch.Tensor  # (R, L) bool, filled with image tokens in (row, image, token) order
    suffix_slots: torch.Tensor  # (R, L) bool, filled with suffix embeddings in (row, frame, k) order
    suffix_positions: torch.Tensor  # (R, S) the positions of the suffix slots, found on the CPU where rows are made
    frame: torch.Tensor  # (R, L) frame (within the row) whose images came last at or before a position, -1 before any
    frames_per_row: int
    views: int

    def to(self, device) -> Context:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Context(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in moved.items()})


def row_layout(tokenizer, image_block: tuple[list[int], int, list[int]], instruction: str, frames: int, views: int,
               suffix_length: int, interleaved: bool, instruction_per_frame: bool):
    """One row's token ids, what each position holds, and the frame whose images came last at each position."""
    before, slots, after = image_block
    block_ids = before + [tokenizer.pad_token_id] * slots + after
    block_kind = [TEXT] * len(before) + [IMAGE] * slots + [TEXT] * len(after)
    instruction_ids = tokenizer(instruction, add_special_tokens=False)["input_ids"]
    ids, kind, frame = [tokenizer.bos_token_id], [TEXT], [-1]

    def add(new_ids, new_kind, new_frame):
        ids.extend(new_ids)
        kind.extend(new_kind)
        frame.extend([new_frame] * len(new_ids))

    suffix_ids = [tokenizer.pad_token_id] * suffix_length
    if not interleaved:
        add(block_ids * views, block_kind * views, 0)
        add(instruction_ids, [TEXT] * len(instruction_ids), 0)
        add(suffix_ids, [SUFFIX] * suffix_length, 0)
    else:
        if not instruction_per_frame:
            add(instruction_ids, [TEXT] * len(instruction_ids), -1)
        for t in range(frames):
            if instruction_per_frame:  # after frame t - 1's images, before frame t's
                add(instruction_ids, [TEXT] * len(instruction_ids), t - 1)
            add(block_ids * views, block_kind * views, t)
            add(suffix_ids, [SUFFIX] * suffix_length, t)
    return torch.tensor(ids), torch.tensor(kind), torch.tensor(frame)


def batch_context(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], pad_token_id: int,
                  frames_per_row: int, views: int) -> Context:
    """Rows of `row_layout`, right-padded into one Context."""
    input_ids, kind, frame = (pad_sequence([row[i] for row in rows], batch_first=True, padding_value=value)
                              for i, value in enumerate((pad_token_id, PAD, -1)))
    suffix_slots = kind == SUFFIX  # every row has as many
    return Context(input_ids=input_ids, attention_mask=(kind != PAD).long(), image_slots=kind == IMAGE,
                   suffix_slots=suffix_slots, suffix_positions=suffix_slots.nonzero()[:, 1].view(len(rows), -1),
                   frame=frame, frames_per_row=frames_per_row, views=views)

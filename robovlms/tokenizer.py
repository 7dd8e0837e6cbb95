"""A small byte-level BPE tokenizer trained in code on robot-manipulation instructions.

Tiny backbones cannot download a real tokenizer, so they train this one at build time. Training is
deterministic: the same corpus and settings always give the same vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

_VERBS = ["pick up", "push", "pull", "open", "close", "press", "slide", "turn", "lift", "place", "put", "move",
          "grasp", "reach", "rotate", "insert", "stack", "sweep", "drop", "hammer", "unplug", "plug in", "twist"]
_OBJECTS = ["the button", "the door", "the drawer", "the window", "the handle", "the block", "the red block",
            "the blue block", "the pink block", "the cup", "the mug", "the plate", "the peg", "the lever",
            "the faucet", "the switch", "the slider", "the light bulb", "the coffee mug", "the basket",
            "the ball", "the dial", "the hammer", "the nail", "the shelf", "the bin", "the puck", "the lid",
            "the box", "the spoon", "the towel", "the carrot", "the eggplant", "the coke can", "the sponge"]
_PLACES = ["on the table", "into the drawer", "onto the plate", "to the left", "to the right", "forward",
           "backward", "from the top", "into the bin", "onto the shelf", "in the basket", "towards the robot",
           "away from the robot", "next to the cup", "until it clicks", "all the way"]
_SENTENCES = [
    "press the button from the top", "open the door by its handle", "slide the plate into the goal",
    "open the window to the left", "close the window to the right", "turn on the faucet", "turn off the faucet",
    "push the puck to the goal", "reach the target position", "pick up the block and place it in the bin",
    "stack the red block on top of the blue block", "rotate the dial clockwise", "lift the cup off the table",
    "go to the green target and stop", "put the spoon on the towel", "put the carrot on the plate",
    "put the eggplant in the basket", "move the coke can near the sponge", "open the top drawer",
    "close the middle drawer", "turn the light on", "turn the light off", "push the sliding door open",
    "unstack the block", "use the hammer to hit the nail", "sweep the puck into the hole",
]


def instruction_corpus() -> list[str]:
    """Every combination of verb, object and place, plus hand-written instructions; always in the same order."""
    lines = [f"{verb} {thing} {place}" for verb in _VERBS for thing in _OBJECTS for place in _PLACES]
    lines += [f"{verb} {thing}" for verb in _VERBS for thing in _OBJECTS]
    return lines + _SENTENCES


def train_instruction_tokenizer(vocab_size: int = 512,
                                extra_special_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE with <s>, </s>, <pad>, <unk> (ids 0-3), then `extra_special_tokens`, then bytes and merges."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_trained_bpe(vocab_size, tuple(extra_special_tokens)),
                                        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    if extra_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    return tokenizer


def _trained_bpe(vocab_size: int, extra_special_tokens: tuple[str, ...]) -> Tokenizer:
    """A fresh copy of the BPE trained once per process for these settings (training takes a second)."""
    return Tokenizer.from_str(_trained_bpe_json(vocab_size, extra_special_tokens))


@functools.lru_cache(maxsize=16)
def _trained_bpe_json(vocab_size: int, extra_special_tokens: tuple[str, ...]) -> str:
    bpe = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space: "push" and " push" tokenize alike, wherever an instruction lands in a context
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD, UNK, *extra_special_tokens],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(instruction_corpus(), trainer=trainer)
    return bpe.to_str()


class StandInTokenizer(PreTrainedTokenizerFast):
    """The instruction tokenizer standing in for a published model's own when only the model's architecture is
    built (its files are not on this machine): it tokenizes as a small BPE, and counts as many tokens as the
    published tokenizer, so that action tokens appended to it grow the embeddings as they would grow the
    published model's."""

    def __init__(self, *args, published_length: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.published_length = published_length
        self.mark_published()

    def mark_published(self) -> None:
        """The tokens added so far (a processor's special tokens) are among the published tokenizer's."""
        self.marked_length = super().__len__()

    def __len__(self) -> int:
        return self.published_length + super().__len__() - self.marked_length  # the published ones, then added

    @property
    def vocab_size(self) -> int:
        return self.published_length


def stand_in_tokenizer(published_length: int, extra_special_tokens: Sequence[str] = ()) -> StandInTokenizer:
    """A StandInTokenizer with the special tokens of `train_instruction_tokenizer` and `extra_special_tokens`;
    call its `mark_published` once the processor has added its own."""
    tokenizer = StandInTokenizer(tokenizer_object=_trained_bpe(512, tuple(extra_special_tokens)), bos_token=BOS,
                                 eos_token=EOS, pad_token=PAD, unk_token=UNK, published_length=published_length)
    if extra_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    return tokenizer

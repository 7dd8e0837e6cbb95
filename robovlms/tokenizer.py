"""A small byte-level BPE tokenizer trained in code on robot-manipulation instructions.

Tiny backbones cannot download a real tokenizer, so they train this one at build time. Training is
deterministic: the same corpus and settings always give the same vocabulary.
"""

from __future__ import annotations

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
    special_tokens = [BOS, EOS, PAD, UNK, *extra_special_tokens]
    bpe = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space: "push" and " push" tokenize alike, wherever an instruction lands in a context
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(instruction_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        unk_token=UNK)
    if extra_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    return tokenizer

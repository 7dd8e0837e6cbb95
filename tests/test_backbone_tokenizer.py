"""The instruction tokenizer tiny backbones train in code."""

from transformers import AutoTokenizer

from robovlms.tokenizer import train_instruction_tokenizer


def test_training_is_deterministic():
    assert train_instruction_tokenizer().get_vocab() == train_instruction_tokenizer().get_vocab()


def test_special_tokens_come_first():
    tokenizer = train_instruction_tokenizer(extra_special_tokens=["<image>"])
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    assert specials == [0, 1, 2, 3]
    assert tokenizer.convert_tokens_to_ids("<image>") == 4
    assert tokenizer("<image> push", add_special_tokens=False)["input_ids"][0] == 4


def test_instructions_tokenize_into_whole_words():
    tokenizer = train_instruction_tokenizer()
    assert tokenizer.tokenize("press the button") == ["Ġpress", "Ġthe", "Ġbutton"]
    assert tokenizer.decode(tokenizer("open the drawer")["input_ids"]).strip() == "open the drawer"


def test_saves_and_reloads_with_auto_tokenizer(tmp_path):
    tokenizer = train_instruction_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    instruction = "slide the plate into the goal"
    assert reloaded(instruction)["input_ids"] == tokenizer(instruction)["input_ids"]
    assert len(reloaded) == len(tokenizer)

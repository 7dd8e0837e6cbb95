import json
from pathlib import Path

import pytest

from robovlms.benchmarks import calvin_sequences
from robovlms.benchmarks.calvin_sequences import (CHAIN_LENGTH, SUBTASK_CATEGORY, SUBTASKS, fnv1_32, get_sequences,
                                                  initial_condition_seed, initial_conditions, is_valid_chain)

GROUND_TRUTH = Path(__file__).resolve().parents[2] / "shared" / "calvin" / "eval_sequences_first10.json"


def test_fnv1_32_matches_pyhash():
    assert fnv1_32("test") == 3910690890  # str: hashed as UTF-16-LE
    assert fnv1_32(b"test") == 3698262380
    assert fnv1_32(b"test", seed=3698262380) == 660137056  # pyhash chains: hasher(a, b) == hasher(b, seed=hasher(a))
    assert fnv1_32(b"") == 0 and fnv1_32("", seed=7) == 7
    condition = initial_conditions()[0]
    assert initial_condition_seed(condition) == fnv1_32(str(condition.values()))


def test_subtasks_and_initial_conditions():
    assert len(SUBTASKS) == 34 and len(set(SUBTASKS)) == 34
    assert SUBTASKS[0] == "rotate_red_block_right" and SUBTASKS[-1] == "push_into_drawer"
    conditions = initial_conditions()
    assert len(conditions) == 192
    for condition in conditions:
        blocks = [condition[b] for b in ("red_block", "blue_block", "pink_block")]
        assert blocks.count("table") in (1, 2) and condition["grasped"] == 0


@pytest.mark.skipif(not GROUND_TRUTH.exists(), reason=f"ground truth {GROUND_TRUTH} is absent")
def test_first_chains_equal_calvins():
    expected = json.loads(GROUND_TRUTH.read_text())
    got = get_sequences(1000, limit=len(expected))
    assert [[condition, list(chain)] for condition, chain in got] == expected
    for (condition, _), (expected_condition, _) in zip(got, expected):
        assert list(condition) == list(expected_condition)  # key order matters for initial_condition_seed


def test_limit_takes_a_prefix_and_calls_are_deterministic():
    head = get_sequences(200, limit=40)
    calvin_sequences._drawn.clear()  # redraw rather than read the cache
    assert get_sequences(200, limit=40, num_workers=2) == head
    assert get_sequences(200)[:40] == head
    assert get_sequences(200, limit=10) == head[:10]
    assert len(get_sequences(20, limit=50)) == 20 and get_sequences(0) == []


def test_chains_are_valid_and_distinct_per_condition():
    chains = get_sequences(200)
    assert len(chains) == 200
    seen = set()
    for condition, chain in chains:
        assert isinstance(chain, tuple) and len(chain) == CHAIN_LENGTH
        assert len({SUBTASK_CATEGORY[name] for name in chain}) == CHAIN_LENGTH  # implies 5 distinct subtasks
        assert is_valid_chain(condition, chain)
        seen.add(tuple(condition.values()))
    assert len(seen) == 192  # every initial condition gets at least one chain
    assert not is_valid_chain(initial_conditions()[0], ["open_drawer", "close_drawer", "turn_on_led",
                                                        "move_slider_left", "lift_red_block_table"])


def test_returned_conditions_are_fresh_copies():
    first = get_sequences(50, limit=1)[0][0]
    first["led"] = "tampered"
    assert get_sequences(50, limit=1)[0][0]["led"] != "tampered"

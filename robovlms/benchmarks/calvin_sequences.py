"""CALVIN's long-horizon evaluation chains, reproduced exactly and ~10x faster, without pyhash.

The CALVIN benchmark scores a policy on 1000 chains of 5 subtasks, each starting from one of 192 symbolic initial
conditions of the scene (switches, slider, drawer, where the three blocks sit). The chains come from `get_sequences`
in mees/calvin (calvin_agent/evaluation/multistep_sequences.py); this is a clean-room port that draws the same
numbers from numpy's legacy Mersenne Twister, so `get_sequences(1000)` returns the very chains, in the same order,
that published CALVIN results were measured on. The original's process pool only parallelised independent
per-condition work, so whether and how we parallelise changes nothing but the time it takes.

`fnv1_32` ports the pyhash hasher that CALVIN's evaluator seeds each initial condition's block layout with
(`initial_condition_seed`); pyhash no longer builds on Python 3.11+.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

CHAIN_LENGTH = 5
BLOCKS = ("red_block", "blue_block", "pink_block")

# The symbolic world state: every key with the values an initial condition may take, in CALVIN's key order (the
# order matters: it fixes the enumeration of initial conditions and the string `initial_condition_seed` hashes).
CONDITION_VALUES: dict[str, tuple[Any, ...]] = {
    "led": (0, 1),
    "lightbulb": (0, 1),
    "slider": ("right", "left"),
    "drawer": ("closed", "open"),
    **{block: ("table", "slider_right", "slider_left") for block in BLOCKS},
    "grasped": (0,),
}
STATE_KEYS = tuple(CONDITION_VALUES)
_INDEX = {key: i for i, key in enumerate(STATE_KEYS)}


# ----------------------------------------------------------------------------------------------------------------
# fnv1_32


def fnv1_32(data: str | bytes, seed: int = 0) -> int:
    """FNV-1 32-bit hash, bit-for-bit as pyhash.fnv1_32()(data, seed=seed).

    pyhash starts from the seed rather than FNV's offset basis, and hashes a str as its UTF-16-LE code units (no BOM).
    """
    if isinstance(data, str):
        data = data.encode("utf-16-le")
    h = seed & 0xFFFFFFFF
    for byte in bytes(data):
        h = ((h * 0x01000193) & 0xFFFFFFFF) ^ byte
    return h


def initial_condition_seed(condition: dict[str, Any]) -> int:
    """The seed CALVIN's evaluator uses to lay out the blocks of an initial condition.

    It hashes `str(condition.values())`, i.e. "dict_values([...])", so the dict must be in CALVIN's key order.
    """
    return fnv1_32(str(condition.values()))


# ----------------------------------------------------------------------------------------------------------------
# subtasks as symbolic rules


@dataclass(frozen=True)
class Rule:
    """One way a subtask can apply: every `require`d key must hold one of its values; `effect` is then written."""

    require: tuple[tuple[int, frozenset], ...]
    effect: tuple[tuple[int, Any], ...]

    def applies(self, state: tuple) -> bool:
        return all(state[i] in allowed for i, allowed in self.require)

    def apply(self, state: tuple) -> tuple:
        out = list(state)
        for i, value in self.effect:
            out[i] = value
        return tuple(out)


def _rule(require: dict[str, Any], effect: dict[str, Any] | None = None) -> Rule:
    """A Rule from readable dicts; a requirement is a value or a tuple of alternatives."""
    req = tuple((_INDEX[k], frozenset(v if isinstance(v, tuple) else (v,))) for k, v in require.items())
    return Rule(req, tuple((_INDEX[k], v) for k, v in (effect or {}).items()))


def _build_subtasks() -> tuple[dict[str, tuple[Rule, ...]], dict[str, int]]:
    """The 34 subtasks (in CALVIN's order, which the sampler indexes into) and their categories.

    A chain never repeats a category, so e.g. it cannot both rotate and push blocks, or lift two blocks off a table.
    """
    rules: dict[str, list[Rule]] = {}
    category: dict[str, int] = {}

    def add(name: str, cat: int, *alternatives: Rule) -> None:
        rules[name], category[name] = list(alternatives), cat

    free, holding = {"grasped": 0}, {"grasped": 1}
    colours = [block.removesuffix("_block") for block in BLOCKS]
    for verb in ("rotate", "push"):  # manipulations that leave a block on the table
        for colour, block in zip(colours, BLOCKS):
            for side in ("right", "left"):
                add(f"{verb}_{colour}_block_{side}", 1, _rule({block: "table", **free}))
    add("move_slider_left", 2, _rule({"slider": "right", **free}, {"slider": "left"}))
    add("move_slider_right", 2, _rule({"slider": "left", **free}, {"slider": "right"}))
    add("open_drawer", 3, _rule({"drawer": "closed", **free}, {"drawer": "open"}))
    add("close_drawer", 3, _rule({"drawer": "open", **free}, {"drawer": "closed"}))
    for colour, block in zip(colours, BLOCKS):
        lifted = {block: "grasped", **holding}
        add(f"lift_{colour}_block_table", 4, _rule({block: "table", **free}, lifted))
        # as CALVIN has it: a block is lifted from the slider half opposite the door, and placed on the door's side
        add(f"lift_{colour}_block_slider", 5, _rule({block: "slider_left", "slider": "right", **free}, lifted),
            _rule({block: "slider_right", "slider": "left", **free}, lifted))
        add(f"lift_{colour}_block_drawer", 6, _rule({block: "drawer", "drawer": "open", **free}, lifted))
    add("place_in_slider", 7, *(_rule({block: "grasped", "slider": side, **holding}, {block: f"slider_{side}", **free})
                                for block in BLOCKS for side in ("right", "left")))
    add("place_in_drawer", 7, *(_rule({block: "grasped", "drawer": "open", **holding}, {block: "drawer", **free})
                                for block in BLOCKS))
    pairs = [(top, bottom) for top in BLOCKS for bottom in BLOCKS if top != bottom]
    add("stack_block", 10, *(_rule({top: "grasped", bottom: "table", **holding},
                                   {top: "stacked_top", bottom: "stacked_bottom", **free}) for top, bottom in pairs))
    add("unstack_block", 11, *(_rule({top: "stacked_top", bottom: "stacked_bottom", **free},
                                     {top: "table", bottom: "table"}) for top, bottom in pairs))
    for switch in ("lightbulb", "led"):
        add(f"turn_on_{switch}", 8, _rule({switch: 0, **free}, {switch: 1}))
        add(f"turn_off_{switch}", 8, _rule({switch: 1, **free}, {switch: 0}))
    in_slider = ("slider_right", "slider_left")
    add("push_into_drawer", 9, *(_rule({block: "table", **{b: in_slider for b in BLOCKS if b != block},
                                        "drawer": "open", **free}, {block: "drawer"}) for block in BLOCKS))
    return {name: tuple(alts) for name, alts in rules.items()}, category


SUBTASK_RULES, SUBTASK_CATEGORY = _build_subtasks()
SUBTASKS: tuple[str, ...] = tuple(SUBTASK_RULES)  # the 34 subtask names, in the order CALVIN samples them from


def _state(condition: dict[str, Any]) -> tuple:
    return tuple(condition[key] for key in STATE_KEYS)


def _feasible(state: tuple, chain: tuple[str, ...]) -> bool:
    """Whether `chain` runs from `state` with exactly one applicable rule per step and no repeated category."""
    if len({SUBTASK_CATEGORY[name] for name in chain}) != len(chain):
        return False
    for name in chain:
        successors = [rule.apply(state) for rule in SUBTASK_RULES[name] if rule.applies(state)]
        if len(successors) != 1:  # ambiguous (e.g. stack_block with two free blocks on the table) counts as invalid
            return False
        state = successors[0]
    return True


def is_valid_chain(condition: dict[str, Any], chain: tuple[str, ...] | list[str]) -> bool:
    """Whether CALVIN would accept `chain` as an evaluation chain from initial condition `condition`."""
    return _feasible(_state(condition), tuple(chain))


# ----------------------------------------------------------------------------------------------------------------
# the evaluation chains


def initial_conditions() -> list[dict[str, Any]]:
    """CALVIN's initial conditions: one or two blocks on the table, the rest in distinct halves of the slider."""
    def plausible(values: tuple) -> bool:
        return values.count("table") in (1, 2) and values.count("slider_right") < 2 and values.count("slider_left") < 2

    combos = itertools.product(*CONDITION_VALUES.values())
    return [dict(zip(STATE_KEYS, values)) for values in combos if plausible(values)]


@functools.cache
def _transition_table() -> tuple[dict[tuple, int], np.ndarray]:
    """Every world state reachable from an initial condition, and table[state, subtask] -> next state.

    A subtask that does not apply, or applies ambiguously, leads to the extra absorbing state `len(ids)`.
    """
    ids: dict[tuple, int] = {}
    frontier = [_state(condition) for condition in initial_conditions()]
    successors = []
    while frontier:
        state = frontier.pop()
        if state in ids:
            continue
        ids[state] = len(ids)
        row = []
        for name in SUBTASKS:
            nexts = [rule.apply(state) for rule in SUBTASK_RULES[name] if rule.applies(state)]
            row.append(nexts[0] if len(nexts) == 1 else None)
            frontier.extend(row[-1:] if row[-1] is not None else [])
        successors.append(row)
    dead = len(ids)
    table = np.full((dead + 1, len(SUBTASKS)), dead, dtype=np.int32)
    for i, row in enumerate(successors):
        table[i] = [dead if nxt is None else ids[nxt] for nxt in row]
    return ids, table


_CATEGORY_OF = np.array([SUBTASK_CATEGORY[name] for name in SUBTASKS])


def _feasible_batch(state: tuple, picks: np.ndarray) -> np.ndarray:
    """_feasible for a (n, CHAIN_LENGTH) array of subtask indices, as a boolean mask."""
    ids, table = _transition_table()
    categories = np.sort(_CATEGORY_OF[picks], axis=1)
    ok = (np.diff(categories, axis=1) != 0).all(axis=1)
    current = np.full(len(picks), ids[state])
    for step in range(picks.shape[1]):
        current = table[current, picks[:, step]]
    return ok & (current != len(ids))


def sample_chains(condition: dict[str, Any], count: int, seed: int) -> list[tuple[str, ...]]:
    """Rejection-sample `count` feasible chains, drawing 5 distinct subtasks at a time as CALVIN does.

    CALVIN draws np.random.choice(34 names, 5, replace=False) after np.random.seed(seed); in numpy's legacy
    RandomState that is the first 5 entries of a Fisher-Yates shuffle of range(34), so shuffling rows of a
    block in place consumes the identical stream, ~5x faster, and the batch is then checked vectorised.
    """
    rng = np.random.RandomState(seed)
    state, chains = _state(condition), []
    while len(chains) < count:  # about 1 draw in 6000 is feasible; draws past the last one needed are harmless
        rows = np.tile(np.arange(len(SUBTASKS), dtype=np.int8), (8192, 1))
        for _ in map(rng.shuffle, rows):  # one legacy shuffle per row; map keeps the loop in C
            pass
        picks = rows[:, :CHAIN_LENGTH]
        for row in picks[_feasible_batch(state, picks)][: count - len(chains)]:
            chains.append(tuple(SUBTASKS[i] for i in row))
    return chains


_drawn: dict[int, tuple[tuple[str, ...], ...]] = {}  # condition index -> its chains drawn so far (a prefix)


def _draw(needed: dict[int, int], conditions: list[dict[str, Any]], num_workers: int) -> None:
    """Make `_drawn[i]` hold at least `needed[i]` chains; condition i samples with seed i, as in CALVIN."""
    todo = [i for i, count in needed.items() if len(_drawn.get(i, ())) < count]
    args = ([conditions[i] for i in todo], [needed[i] for i in todo], todo)
    if num_workers > 1 and len(todo) > 1:
        context = multiprocessing.get_context("spawn")  # the caller may hold torch threads, which fork does not survive
        with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            results = list(pool.map(sample_chains, *args, chunksize=4))
    else:
        results = list(map(sample_chains, *args))
    _drawn.update((i, tuple(chains)) for i, chains in zip(todo, results))


def get_sequences(num_sequences: int = 1000, num_workers: int | None = None,
                  limit: int | None = None) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """CALVIN's evaluation chains: (initial condition, 5 subtask names) pairs, identical to mees/calvin's.

    `limit` returns only the first `limit` of the `num_sequences` chains (the same ones, drawing only what they
    need). Runs in-process unless `num_workers` > 1; the result never depends on it. Chains are cached.
    """
    conditions = initial_conditions()
    # the chains are split as evenly as possible, the first conditions taking the remainder (np.array_split's rule)
    base, extra = divmod(num_sequences, len(conditions))
    starts = np.cumsum([0] + [base + (i < extra) for i in range(len(conditions))])
    # CALVIN concatenates every condition's chains, then shuffles the list with seed 0. The same shuffle of the
    # indices says which chain lands where: position k holds chain `rank[k]` of condition `owner[k]`.
    order = np.random.RandomState(0).permutation(num_sequences)[:limit]
    owner = (np.searchsorted(starts, order, side="right") - 1).tolist()
    rank = (order - starts[owner]).tolist() if owner else []
    needed: dict[int, int] = {}
    for i, r in zip(owner, rank):
        needed[i] = max(needed.get(i, 0), r + 1)
    _draw(needed, conditions, num_workers or 1)
    return [(dict(conditions[i]), _drawn[i][r]) for i, r in zip(owner, rank)]

"""Text form round trips, golden schedules, and the validator's error messages.

The golden files under ``golden/`` hold ``validate(build(...)).to_text()``: the lowered schedule a
runtime would execute, one line per rank. They were checked by eye against the papers (the
structural tests below pin the parts the papers state). After an intended change to a generator
or to lowering, rewrite them with::

    LAYERWISE_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_schedule_validate.py

and review the diff like code.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layerwise.schedule.actions import Action, Kind, format_actions, parse_actions
from layerwise.schedule.core import Schedule, ranks_from_text
from layerwise.schedule.generators import build
from layerwise.schedule.validate import ScheduleError, validate

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN: dict[str, dict[str, int]] = {
    "gpipe_p2_m3": {"stages": 2, "microbatches": 3},
    "1f1b_p4_m8": {"stages": 4, "microbatches": 8},
    "1f1b_p4_m2": {"stages": 4, "microbatches": 2},
    "interleaved_p2_v2_m4": {"stages": 2, "microbatches": 4, "chunks": 2},
    "zb-h1_p4_m6": {"stages": 4, "microbatches": 6},
    "zb-h2_p4_m6": {"stages": 4, "microbatches": 6},
    "zbv_p4_m8": {"stages": 4, "microbatches": 8},
    "zbv_p2_m3": {"stages": 2, "microbatches": 3},
}

actions = st.builds(
    Action,
    stage=st.integers(min_value=0, max_value=10_000),
    kind=st.sampled_from(Kind),
    microbatch=st.integers(min_value=0, max_value=10_000),
)


# --- Text form -------------------------------------------------------------------------------


@given(actions)
def test_action_text_round_trip(action: Action) -> None:
    text = str(action)
    assert text == f"{action.stage}{action.kind.value}{action.microbatch}"
    assert Action.parse(text) == action


@given(st.lists(actions, max_size=30))
def test_action_list_round_trip(acts: list[Action]) -> None:
    assert parse_actions(format_actions(acts)) == acts


@given(st.lists(st.lists(actions, max_size=12), min_size=1, max_size=6))
def test_schedule_text_round_trip(ranks: list[list[Action]]) -> None:
    schedule = Schedule(
        name="any",
        num_microbatches=1,
        stage_to_rank=tuple(range(len(ranks))),
        ranks=tuple(tuple(r) for r in ranks),
    )
    assert ranks_from_text(schedule.to_text()) == ranks


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_generated_schedule_text_round_trip(name: str) -> None:
    compute = build(name.split("_")[0], **GOLDEN[name])
    for schedule in (compute, validate(compute)):
        assert ranks_from_text(schedule.to_text()) == [list(r) for r in schedule.ranks]


@pytest.mark.parametrize("text", ["", "F0", "1X0", "-1F0", "1F", "1 F 0", "1SF", "1FF0"])
def test_bad_action_text_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="cannot parse action"):
        Action.parse(text)


def test_bad_schedule_line_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected 'rank <r>: <actions>'"):
        ranks_from_text("rank 0: 0F0\nstage 1: 1F0")


# --- Golden files ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_schedule(name: str) -> None:
    generated = validate(build(name.split("_")[0], **GOLDEN[name])).to_text() + "\n"
    path = GOLDEN_DIR / f"{name}.txt"
    if os.environ.get("LAYERWISE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(generated, encoding="utf-8")
        return
    expected = path.read_text(encoding="utf-8") if path.exists() else ""
    if generated != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                generated.splitlines(keepends=True),
                fromfile=f"golden/{name}.txt",
                tofile="generated",
            )
        )
        pytest.fail(
            f"schedule {name} differs from its golden file:\n{diff}"
            f"{_first_differences(expected, generated)}\n"
            "If the change is intended, regenerate with\n"
            "  LAYERWISE_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_schedule_validate.py\n"
            "and review the diff of tests/unit/golden/.",
            pytrace=False,
        )


def _first_differences(expected: str, generated: str) -> str:
    """Per rank, the first step that differs: rank lines are long, a line diff alone hides it."""
    out = []
    for r, (old, new) in enumerate(zip(expected.splitlines(), generated.splitlines())):
        a, b = old.split(":", 1)[-1].split(), new.split(":", 1)[-1].split()
        step = next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if a != b:
            got = b[step] if step < len(b) else "(end)"
            want = a[step] if step < len(a) else "(end)"
            out.append(f"rank {r} first differs at step {step}: golden {want}, generated {got}\n")
    return "".join(out)


# --- What the papers say the schedules look like ---------------------------------------------


def _before_first(acts: tuple[Action, ...], kind: Kind) -> list[Action]:
    first = next(n for n, a in enumerate(acts) if a.kind is kind)
    return list(acts[:first])


def test_1f1b_warms_up_with_p_minus_s_minus_1_forwards() -> None:
    # Narayanan et al. 2021, Sec. 2.2.1: stage s runs p - s - 1 warm-up forwards, then one
    # forward and one backward in turn; so p - s forwards precede its first backward.
    p = 4
    for m in (2, 8):
        schedule = build("1f1b", stages=p, microbatches=m)
        for s, acts in enumerate(schedule.ranks):
            assert len(_before_first(acts, Kind.B)) == min(p - s, m)
            steady = acts[min(p - s - 1, m) :]
            kinds = [a.kind for a in steady]
            steps = max(m - (p - s - 1), 0)
            assert kinds[: 2 * steps] == [Kind.F, Kind.B] * steps


def test_interleaved_warms_up_like_megatron() -> None:
    # Megatron-LM's interleaved schedule: rank r runs 2 (p - r - 1) + (v - 1) p warm-up forwards,
    # in groups of p microbatches per chunk, chunk 0 first.
    p, v, m = 2, 2, 4
    schedule = build("interleaved", stages=p, microbatches=m, chunks=v)
    assert schedule.stage_to_rank == (0, 1, 0, 1)
    for r, acts in enumerate(schedule.ranks):
        warm = 2 * (p - r - 1) + (v - 1) * p
        assert len(_before_first(acts, Kind.B)) == warm + 1  # the steady state opens with an F
    assert [str(a) for a in schedule.ranks[0][:4]] == ["0F0", "0F1", "2F0", "2F1"]
    assert str(schedule.ranks[0][5]) == "2B0"  # backward starts from the last chunk


def test_zb_h1_postpones_s_weight_gradients_on_stage_s() -> None:
    # Qi et al. 2023, Sec. 3.1 (ZB-H1): 1F1B with B split into I and W; stage s delays its W's
    # by s microbatches so the postponed W's fill the drain bubble.
    p, m = 4, 6
    schedule = build("zb-h1", stages=p, microbatches=m)
    one = build("1f1b", stages=p, microbatches=m)
    for s, acts in enumerate(schedule.ranks):
        without_w = [Action(a.stage, Kind.B, a.microbatch) if a.kind is Kind.I else a for a in acts]
        assert [a for a in without_w if a.kind is not Kind.W] == list(one.ranks[s])
        first_w = next(n for n, a in enumerate(acts) if a.kind is Kind.W)
        assert acts[first_w - 1] == Action(s, Kind.I, min(s, m - 1))
        assert acts[first_w] == Action(s, Kind.W, 0)


# --- Validator errors ------------------------------------------------------------------------


def _edit(schedule: Schedule, change: Callable[[list[list[Action]]], None]) -> Schedule:
    ranks = [list(r) for r in schedule.ranks]
    change(ranks)
    return schedule.with_ranks(ranks)


def _a(text: str) -> Action:
    return Action.parse(text)


_ONE = build("1f1b", stages=2, microbatches=3)  # rank 0: 0F0 0F1 0B0 0F2 0B1 0B2
_LOWERED = validate(_ONE)


def _swap_f_b(ranks: list[list[Action]]) -> None:
    ranks[1][0], ranks[1][1] = ranks[1][1], ranks[1][0]  # 1B0 before the 1F0 it needs


def _wrong_rank(ranks: list[list[Action]]) -> None:
    ranks[1].remove(_a("1F0"))
    ranks[0].insert(1, _a("1F0"))


def _drop_send(ranks: list[list[Action]]) -> None:
    ranks[0].remove(_a("0SF1"))


def _recv_first(ranks: list[list[Action]]) -> None:
    # rank 0 waits for the gradient of microbatch 0 before sending its activation: rank 1 waits
    # for that activation, so each waits on the other.
    ranks[0].remove(_a("0RB0"))
    ranks[0].insert(0, _a("0RB0"))


# (schedule, edit, text the message must contain, cells that must be marked)
CASES = {
    "duplicated": (
        _ONE,
        lambda r: r[0].insert(2, _a("0F1")),
        "0F1 (stage 0 forward of microbatch 1) appears 2 times",
        ["0F1"],
    ),
    "dropped": (
        _ONE,
        lambda r: r[1].remove(_a("1B1")),
        "1B1 (stage 1 backward of microbatch 1) is missing from rank 1",
        ["1F1"],  # what is left of microbatch 1 on that stage, to show where 1B1 belongs
    ),
    "swapped": (_ONE, _swap_f_b, "1B0 needs 1F0 (stage 1 forward of microbatch 0) first", ["1B0"]),
    "wrong rank": (_ONE, _wrong_rank, "1F0 is on rank 0 but stage 1 is placed on rank 1", ["1F0"]),
    "out of range": (_ONE, lambda r: r[0].append(_a("0F7")), "0F7 on rank 0 is out of range", ["0F7"]),
    "no matching send": (
        _LOWERED,
        _drop_send,
        "1RF1 (stage 1 receive of the activation of microbatch 1) on rank 1 has no matching 0SF1",
        ["1RF1"],
    ),
    "deadlock": (_LOWERED, _recv_first, "schedule deadlocks", ["0RB0", "1RF0"]),
    "B in split schedule": (
        validate(build("zb-h1", stages=2, microbatches=2)),  # lowered: no receive is added for it
        lambda r: r[0].append(_a("0B0")),
        "0B0 does not belong in a schedule that uses I and W",
        ["0B0"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validator_marks_the_broken_step(case: str) -> None:
    schedule, change, says, marked = CASES[case]
    with pytest.raises(ScheduleError) as err:
        validate(_edit(schedule, change))
    message = str(err.value)
    assert says in message
    for cell in marked:
        assert f">>{cell}<<" in message, f"{cell} not marked in:\n{message}"
    assert len(err.value.marks) >= len(marked)
    assert "step  rank 0" in message  # the grid is there


def test_deadlock_names_both_waits() -> None:
    with pytest.raises(ScheduleError) as err:
        validate(_edit(_LOWERED, _recv_first))
    message = str(err.value)
    assert "rank 0 step 0: 0RB0 waits for 1SB0" in message
    assert "rank 1 step 0: 1RF0 waits for 0SF0" in message


def test_valid_schedules_pass_and_lowering_is_idempotent() -> None:
    for name, kwargs in GOLDEN.items():
        lowered = validate(build(name.split("_")[0], **kwargs))
        assert validate(lowered) == lowered


def test_a_channel_received_out_of_order_is_rejected() -> None:
    # Dependencies alone would allow rank 1 to take microbatch 1's activation before
    # microbatch 0's, but the runtime (and NCCL) need each channel received in the order sent.
    sched = validate(build("gpipe", stages=2, microbatches=2))
    ranks = [list(r) for r in sched.ranks]
    ranks[1] = [Action.parse(t) for t in "1RF1 1RF0 1F0 1F1 1B0 1SB0 1B1 1SB1".split()]
    with pytest.raises(ScheduleError) as info:
        validate(sched.with_ranks(ranks))
    text = str(info.value)
    assert "sends its activations for microbatches in the order [0, 1]" in text
    assert "received in the order [1, 0]" in text
    assert ">>1RF1<<" in text and ">>0SF0<<" in text

"""The trainer's side of trust (``swarm/trainer/trust.py``): replies checked against the request, spot
checks by another holder or by the trainer itself, proof that bans at once, probation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from layerwise.swarm.guard import Reason, Rejected
from layerwise.swarm.spec import SwarmSpec, build_layers
from layerwise.swarm.spot import recompute
from layerwise.swarm.wire import Message

SPEC = SwarmSpec(width=16, heads=2, blocks=2, seq=8, batch_size=4, microbatches=2)


def test_the_trainer_names_replies_from_another_step_stage_or_microbatch() -> None:
    from types import SimpleNamespace

    from layerwise.swarm.assignment import Assignment, StageSpan
    from layerwise.swarm.trainer.trust import Trust

    stages = (StageSpan(stage=0, first=0, count=2, holder="a", copy="b"),
              StageSpan(stage=1, first=2, count=2, holder="b", copy="a"))  # fmt: skip
    tr: Any = SimpleNamespace(spec=SPEC, opts=SimpleNamespace(ban_after=2, spot_check=0.0, probation_checks=90), losses=[],
                              assignment=Assignment(epoch=1, stages=stages))  # fmt: skip
    trust = Trust(tr)
    msg = Message("forward", 5, 1, 1, 1, {"weight": 0.5}, [torch.randn(2, 8, 16)])
    cases = {Reason.WRONG_STAGE: Message("ok", 5, 0, 1, tensors=[torch.tensor(1.0)]),
             Reason.REPLAYED: Message("ok", 4, 1, 1, tensors=[torch.tensor(1.0)]),
             Reason.OUT_OF_ORDER: Message("ok", 5, 1, 0, tensors=[torch.tensor(1.0)]),
             Reason.BAD_SHAPE: Message("ok", 5, 1, 1, tensors=[torch.ones(1)]),
             Reason.NONFINITE: Message("ok", 5, 1, 1, tensors=[torch.tensor(float("inf"))]),
             Reason.MALFORMED: Message("status", 5, 1, 1)}  # fmt: skip
    for reason, reply in cases.items():
        with pytest.raises(Rejected) as e:
            trust._verify(1, msg, reply, "b")
        assert e.value.reason == reason and e.value.sender == "b"
    trust._verify(1, msg, Message("ok", 5, 1, 1, tensors=[torch.tensor(2.5)]), "b")  # the last stage's loss
    # the largest reply that can be right: the stage's outputs plus headers, far below the 4 GiB default
    assert 2 * 8 * 16 * 8 < trust._limit(msg) < 1 << 20
    nparams = sum(p.numel() for m in build_layers(SPEC)[2:4] for p in m.parameters())
    assert 4 * nparams < trust._limit(Message("commit", 5, 1)) < 4 * nparams + (1 << 20)


def test_a_mismatch_bans_at_once_only_when_the_holders_weights_agree_with_the_copys() -> None:
    """The trainer's recomputation is proof only from weights both sides hold: a copy that makes up
    its weights (and a check reply to match) cannot get an honest holder banned, only checked."""
    from types import SimpleNamespace

    from layerwise.swarm.assignment import Assignment, StageSpan
    from layerwise.swarm.trainer.trust import Trust

    layers = build_layers(SPEC)[2:4]  # stage 1: the last two layers (embedding, blocks, head)
    true_w = [p.detach().clone() for m in layers for p in m.parameters()]
    made_up = [w + 0.1 * torch.randn_like(w) for w in true_w]

    def state(ws: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t for w in ws for t in (w, torch.zeros_like(w), torch.zeros_like(w))]

    rows = SPEC.batch_size // SPEC.microbatches
    x = torch.randn(rows, SPEC.seq, SPEC.width)
    y = torch.randint(0, 256, (rows, SPEC.seq))
    msg = Message("forward", 0, 1, 0, 1, {"weight": 0.5}, [x, y])
    check = Message("check", 0, 1, 0, 1, {"what": "forward", "weight": 0.5}, [x, y])

    def loss_with(ws: list[torch.Tensor]) -> torch.Tensor:
        from layerwise.swarm.spot import load_layers

        mods = load_layers(SPEC, 2, 2, state(ws))
        return recompute(mods, is_first=False, is_last=True, what="forward", tensors=[x, y], weight=0.5)[0]

    stages = (StageSpan(stage=0, first=0, count=2, holder="a", copy="b"),
              StageSpan(stage=1, first=2, count=2, holder="b", copy="a"))  # fmt: skip
    for liar in ("holder", "copy"):
        weights = {"b": true_w, "a": made_up if liar == "copy" else true_w}
        node = SimpleNamespace(request=lambda peer, m, *a, **k: Message("ok", stage=1, tensors=state(weights[peer])))
        tr: Any = SimpleNamespace(spec=SPEC, opts=SimpleNamespace(ban_after=2, spot_check=0.05, probation_checks=90),
                                  losses=[], assignment=Assignment(epoch=1, stages=stages), node=node, epoch=1,
                                  failures=[], recopy=lambda s: None)  # fmt: skip
        trust = Trust(tr)
        honest = loss_with(true_w)
        if liar == "holder":
            reply, other = Message("ok", 0, 1, 0, tensors=[honest * 1.05]), Message("ok", 0, 1, 0, tensors=[honest])
        else:
            reply, other = Message("ok", 0, 1, 0, tensors=[honest]), Message("ok", 0, 1, 0, tensors=[loss_with(made_up)])
        with pytest.raises(Rejected) as e:
            trust._compare(1, msg, check, reply, "b", "a", {"reply": other})
        assert e.value.reason == Reason.MISMATCH and e.value.sender == "b"
        if liar == "holder":  # proof: the holder is banned at once, the copy passed
            assert trust.banned("b") and trust.status()["bans"][0]["confirmed"] and not trust.banned("a")
            assert trust.stats["confirmed"] == 1 and trust.ledger.passed["a"] == 1
        else:  # suspicion only: the copy, which agreed with its own made-up weights, is not confirmed either
            assert not trust.banned("b") and not trust.banned("a") and trust.stats["confirmed"] == 0
            assert trust.on_probation("b")  # unproven, so every output of it is checked; the driver adds a strike


def test_a_new_peer_is_on_probation_until_it_passed_its_checks_and_again_after_a_failure() -> None:
    from types import SimpleNamespace

    from layerwise.swarm.trainer.options import Failure
    from layerwise.swarm.trainer.trust import Trust

    for rate in (0.0, 0.05):
        tr: Any = SimpleNamespace(spec=SPEC, opts=SimpleNamespace(ban_after=2, spot_check=rate, probation_checks=3),
                                  losses=[], failures=[])  # fmt: skip
        trust = Trust(tr)
        assert trust.on_probation("a") == (rate > 0)  # without spot checks, only a strike means probation
        for _ in range(3):
            trust.ledger.passes("a")
        assert not trust.on_probation("a") and trust.status()["checks_passed"] == {"a": 3}
        tr.failures.append(Failure(peer="a", step=4, phase="forward", noticed_at=0.0, left_at=None))
        assert trust.on_probation("a") == (rate > 0)  # it may come back as another process: earned again
        trust.ledger.passes("a")
        assert trust.on_probation("a") == (rate > 0)  # one of three passes since its return


def test_a_replicated_stage_is_spot_checked_by_another_replica_when_it_has_no_copy() -> None:
    """Outputs of a stage with replicas and no copy are checked by another live, unbanned replica;
    with nobody else holding the layers there is no checker (the trainer then checks alone)."""
    from types import SimpleNamespace

    from layerwise.swarm.assignment import Assignment, StageSpan
    from layerwise.swarm.trainer.trust import Trust

    alive = {"a", "b", "c"}
    stages = (StageSpan(stage=0, first=0, count=2, holder="a", copy=None, replicas=("b", "c")),
              StageSpan(stage=1, first=2, count=2, holder="c", copy=None))  # fmt: skip
    tr: Any = SimpleNamespace(spec=SPEC, opts=SimpleNamespace(ban_after=2, spot_check=1.0, probation_checks=0),
                              losses=[], assignment=Assignment(epoch=1, stages=stages),
                              membership=SimpleNamespace(is_alive=lambda p: p in alive))  # fmt: skip
    trust = Trust(tr)
    assert trust._checker(0, "a") == "b" and trust._checker(0, "b") == "a"
    alive.discard("b")
    assert trust._checker(0, "a") == "c"  # a dead replica checks nothing
    trust.ledger.strike("c", Reason.MISMATCH, 0, confirmed=True)
    assert trust._checker(0, "a") is None  # nor does a banned one
    assert trust._checker(1, "c") is None  # a single holder and no copy: nobody to recompute


def test_a_chosen_output_with_no_other_holder_to_check_it_is_checked_by_the_trainer() -> None:
    """No live, unbanned other holder (or a checker whose answer is unusable): the trainer recomputes
    the output from the holder's own weights. A right one passes; a wrong one is proof (the holder's
    weights do not give it), banned at once; a holder that will not give its weights is not believed."""
    from types import SimpleNamespace

    from layerwise.swarm.assignment import Assignment, StageSpan
    from layerwise.swarm.spot import load_layers
    from layerwise.swarm.trainer.trust import Trust

    weights = [p.detach().clone() for m in build_layers(SPEC)[2:4] for p in m.parameters()]
    state = [t for w in weights for t in (w, torch.zeros_like(w), torch.zeros_like(w))]
    rows = SPEC.batch_size // SPEC.microbatches
    x, y = torch.randn(rows, SPEC.seq, SPEC.width), torch.randint(0, 256, (rows, SPEC.seq))
    msg = Message("forward", 0, 1, 0, 1, {"weight": 0.5}, [x, y])
    check = Message("check", 0, 1, 0, 1, {"what": "forward", "weight": 0.5}, [x, y])
    honest = recompute(load_layers(SPEC, 2, 2, state), is_first=False, is_last=True, what="forward",
                       tensors=[x, y], weight=0.5)[0]  # fmt: skip
    stages = (StageSpan(stage=0, first=0, count=2, holder="a", copy=None),
              StageSpan(stage=1, first=2, count=2, holder="b", copy=None))  # fmt: skip
    answers: dict[str, Any] = {"b": Message("ok", stage=1, tensors=state)}

    def request(peer: str, m: Message, *a: Any, **k: Any) -> Message:
        assert m.kind == "get_state" and peer == "b"
        return answers[peer]

    def trust_of() -> Any:
        tr: Any = SimpleNamespace(spec=SPEC, opts=SimpleNamespace(ban_after=2, spot_check=1.0, probation_checks=90),
                                  losses=[], assignment=Assignment(epoch=1, stages=stages), epoch=1, failures=[],
                                  node=SimpleNamespace(request=request), recopy=lambda s: None)  # fmt: skip
        return Trust(tr)

    trust = trust_of()
    assert trust._checker(1, "b") is None
    trust._check_alone(1, msg, check, Message("ok", 0, 1, 0, tensors=[honest.clone()]), "b")
    assert trust.ledger.passed["b"] == 1 and not trust.banned("b") and trust.stats["alone"] == 1
    with pytest.raises(Rejected) as e:
        trust._check_alone(1, msg, check, Message("ok", 0, 1, 0, tensors=[honest * 1.05]), "b")
    assert e.value.reason == Reason.MISMATCH and e.value.sender == "b"
    assert trust.banned("b") and trust.status()["bans"][0]["confirmed"] and trust.stats["confirmed"] == 1
    # the checker's answer was unusable (a Rejected reply): its strike, and the trainer checks the holder
    trust = trust_of()
    with pytest.raises(Rejected):
        trust._compare(1, msg, check, Message("ok", 0, 1, 0, tensors=[honest * 1.05]), "b", "a",
                       {"error": Rejected("garbage", Reason.GARBAGE, "a")})  # fmt: skip
    assert trust.banned("b") and trust.status()["rejected"].get("garbage") == 1
    # weights that cannot be loaded (or none at all): the output is not used
    trust = trust_of()
    answers["b"] = Message("ok", stage=1, tensors=state[:3])
    with pytest.raises(Rejected, match="could not be checked"):
        trust._check_alone(1, msg, check, Message("ok", 0, 1, 0, tensors=[honest.clone()]), "b")

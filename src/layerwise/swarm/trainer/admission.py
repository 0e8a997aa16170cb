"""Admitting peers: the trainer's hello to each new member, which measures it or leaves it out."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from ..errors import PeerLost
from ..identity import Refused
from ..wire import Message

if TYPE_CHECKING:
    from .trainer import Trainer


def measure_new(tr: Trainer) -> None:
    """Say hello to every member not yet measured: record its block time, declared speed and memory;
    leave out one whose certificate fails the signed hello or that builds other initial weights."""
    for peer in sorted(tr.membership.snapshot()):
        if peer in tr.block_s or peer in tr.refused:
            continue
        for _attempt in range(3):  # a peer's queryable may reach us a moment after its token
            try:
                r = tr.node.request(peer, Message("hello", meta={"spec": tr.spec.to_json()}), 60.0)
                break
            except PeerLost:
                time.sleep(0.2)
            except Refused as e:  # its certificate (or ours, for it) failed the signed hello
                tr.ident.refused(peer, e)
                tr.refused.add(peer)
                break
        else:
            continue
        if peer in tr.refused:
            continue
        if r.meta.get("checksum") != tr._checksum:
            tr.refused.add(peer)
            print(f"warning: peer {peer} builds other initial weights from the same spec (another "
                  f"layerwise version?); it is left out", file=sys.stderr, flush=True)
            continue
        tr.block_s[peer] = float(r.meta["block_s"])
        tr.declared[peer] = float(r.meta["speed"])
        tr.epoch = max(tr.epoch, int(r.meta["epoch"]))  # peers remember an earlier trainer's epochs
        tr.memory[peer] = float(r.meta["memory_bytes"])

"""The trainer's settings, and the record of one peer's failure (what ``status`` and the demo report)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..compress import Compression
from ..guard import PROBATION_CHECKS


@dataclass(frozen=True, kw_only=True)
class TrainerOptions:
    swarm: str = "layerwise"
    join: tuple[str, ...] = ()
    listen: tuple[str, ...] = ()
    min_peers: int = 1  # wait for this many peers before the first step
    wait_s: float = 60.0  # how long to wait for them
    max_stages: int | None = None  # default: one stage per peer (up to one layer per stage)
    lease_ms: int = 1000  # zenoh link lease: bounds how long a hung peer goes unnoticed
    request_timeout: float = 120.0  # a live peer's longest request (a stalled one fails by the lease)
    rebalance_threshold: float = 0.15  # move layers only for a predicted gain of at least this
    # how peer speeds are known: "measured" (each peer's block benchmark), "declared" (each peer's
    # --speed, for emulated peers on one shared machine), or "blind" (all 1: bench/swarm.py's baseline)
    capacity: str = "measured"
    checkpoint_dir: str | None = None  # where to save every layer's state at step boundaries
    checkpoint_every: int = 0  # steps between checkpoints; 0 = never
    resume: str | None = None  # a checkpoint directory to start from instead of the seed
    identity: str | None = None  # an identity directory (trainer certificate): mutual TLS, signed hello
    crl: str | None = None  # a revocation list file re-read at every step boundary (default: the identity's)
    spot_check: float = 0.0  # probability that an output is recomputed by the stage's copy (see trust.py)
    ban_after: int = 2  # rejected replies (strikes) that ban a peer; the first puts it on probation
    probation_checks: int = PROBATION_CHECKS  # with spot checks on: checks a new peer passes before it is trusted
    relay: tuple[str, ...] = ()  # relays (zenoh routers) to connect out to, as a zenoh client (relay.py)
    compress: Compression = Compression()  # activations between stages; anything but "none" is inexact

    def __post_init__(self) -> None:
        if not self.join and not self.listen and not self.relay:
            raise ValueError("the trainer needs --join ENDPOINT (or --listen ENDPOINT if it starts the swarm)")
        if self.capacity not in ("measured", "declared", "blind"):
            raise ValueError(f"capacity must be measured, declared or blind, got {self.capacity!r}")
        if self.checkpoint_every < 0 or (self.checkpoint_every and not self.checkpoint_dir):
            raise ValueError("checkpoint_every needs checkpoint_dir, and must be >= 0")
        if not 0.0 <= self.spot_check <= 1.0:
            raise ValueError(f"--spot-check must be a probability in [0, 1], got {self.spot_check}")
        if self.spot_check > 0 and not self.compress.exact:
            raise ValueError(f"--spot-check cannot be combined with --compress {self.compress.mode}: a lossy codec's "
                             f"error is above the tolerance a recomputation is compared with")  # fmt: skip
        if self.ban_after < 1:
            raise ValueError(f"--ban-after must be >= 1, got {self.ban_after}")
        if self.probation_checks < 0:
            raise ValueError(f"--probation-checks must be >= 0, got {self.probation_checks}")
        if self.min_peers < 1:
            raise ValueError(f"min_peers must be >= 1, got {self.min_peers}")


@dataclass
class Failure:
    peer: str
    step: int
    phase: str
    noticed_at: float
    left_at: float | None
    stages: list[int] = field(default_factory=list)
    recovered_at: float | None = None
    phases: list[str] = field(default_factory=list)  # every phase it interrupted, first noticed first

    def interrupted(self, phase: str, stage: int) -> None:
        """The loss interrupted ``stage`` in ``phase``. A peer holding several stages is lost in each: with
        per-stage commits, in the commit of one while an earlier one still runs its backward."""
        if phase not in ("relay", "boundary") and phase not in self.phases:
            self.phases.append(phase)
        if self.phase in ("relay", "boundary"):  # first seen as a copy or between steps; it failed serving
            self.phase = phase
        if stage not in self.stages:
            self.stages.append(stage)

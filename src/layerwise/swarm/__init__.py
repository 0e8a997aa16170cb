"""Swarm mode: train one model split across peers that differ, fail, join and leave, over zenoh.

Peers (``layerwise swarm serve``) hold contiguous spans of layers; a trainer (``layerwise swarm
train``) owns the data and the loss, assigns spans with the partition solver from each peer's
measured speed and memory, drives the microbatches of each step through the holders in the order
of a pipeline schedule, and commits each step. Training is synchronous and equal to one process
(unless activations are compressed, :mod:`.compress`):
a step is committed on every stage or on none, and nothing is lost when a peer dies.

How a step survives a peer's death (the design, with its costs):

- **Every stage has a holder and a copy.** The copy sits on another peer (a spare, else the next
  stage's holder) and holds the stage's weights and AdamW state as of the last committed step.
  At each commit the holder applies its AdamW step and returns its gradients; the trainer relays
  them to the copy, which applies the same update with the same code, so the copy stays
  bit-identical. Memory: each peer holds about two spans (its own and one copy), i.e. 2 x 16
  bytes per parameter of a span with fp32 AdamW. Bandwidth per step: the stage's gradients twice
  (holder -> trainer -> copy), 2 x 4 bytes per parameter, plus what the pipeline already sends.
- **The trainer keeps the step in flight.** All activations and their gradients pass through the
  trainer (the hub, as a Petals client is), which keeps, for the current step, each stage's
  input and output gradient per microbatch (:mod:`.replay`), about two activations per stage
  boundary per microbatch. When a holder dies mid-step, the copy's state (still the committed
  one) is moved to a spare peer or promoted, the stage's completed forwards and backwards are
  replayed from the cache in the same order, and the step goes on. No other stage repeats work.
- **The commit is idempotent.** Messages carry step, stage, microbatch and epoch; a stage at
  committed step ``k + 1`` acknowledges a second commit of step ``k`` without applying it, and a
  copy that already applied step ``k`` ignores it being relayed again. A holder lost during the
  commit is replaced from its copy, which has either not yet applied the step (then the stage is
  replayed and committed) or has (then nothing is left to do).
- **Spare peers are replicas of the slowest stage** (:mod:`.trainer.replicas`). Peers beyond the
  stages (``max_stages``, or more peers than layers) join, one at a time, the stage that is then
  the slowest. A replica is a full holder (weights, AdamW state); microbatch ``mb`` goes to slot
  ``mb % replicas``, each replica sums its own microbatches' gradients, and at the commit the
  trainer adds the replicas' sums in slot order and sends that sum to all of them, so they apply
  the same step and stay bit-identical: each is a live fail-over copy of the others and the stage
  needs no separate copy. A dead replica's slot goes to a spare or to a surviving replica (which
  keeps the slot's sum apart) and its microbatches are replayed there: nothing is lost and the
  sum's order does not change. Memory: each replica holds the stage (16 bytes per parameter with
  fp32 AdamW) plus one gradient buffer per slot it serves. Bandwidth per step and replicated
  stage: each replica's sum to the trainer and the total back, ``2 x R x 4`` bytes per parameter
  for ``R`` replicas (instead of the copy's ``2 x 4``), on top of the activations, which are dealt
  among the replicas and so cost no more than without them. Results equal one process whose
  stage sums the same microbatch groups in the same order bit for bit, and plain one-process
  training to rounding (about 3e-6 after 10 steps of the test model: another order of the sum).
- **Global gradient-norm clipping and tied embeddings** make the commit two-phase
  (:mod:`.trainer.commit`): the stages report their gradients' norms (a float per parameter), a
  weight tied across the first and last stage is summed per microbatch from both (:mod:`.ties`),
  the trainer computes ``clip_grad_norm_``'s coefficient and every stage applies its gradients
  times that coefficient. Both are bit-identical to one process. Cost: one more round trip per
  step; a tie's gradient once per microbatch on each of its two stages.
- **What is not survived**: a stage whose holder and copy are lost together (two peers at once,
  or one peer holding both after earlier failures) stops the run with :class:`StageLost`, which
  names the layers and how to resume (from a checkpoint, :mod:`.checkpoint`, when the trainer
  writes them); the trainer itself is a single point of failure.

Final parameters equal a failure-free run: the replayed computation is the same sequence of
operations on the same inputs, so results are bit-identical wherever a failure did not change
which peer sums what; each peer sums its stage's microbatch gradients in schedule order.

Membership uses zenoh liveliness tokens (:mod:`.membership`): a killed peer is seen in
milliseconds, a hung one after the zenoh lease (``--lease-ms``). Peers that join are measured at
the next step boundary and get layers when the solver predicts a gain above a threshold.
"""

from .errors import PeerLost, StageLost, SwarmError
from .spec import SwarmSpec

__all__ = ["PeerLost", "StageLost", "SwarmError", "SwarmSpec"]

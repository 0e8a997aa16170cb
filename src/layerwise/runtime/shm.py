"""Stage-boundary messages between ranks on one host: the payload through shared memory.

Why by hand: gloo moves a large message in pieces from background threads on both processes.
When every core runs a stage (one process per core, as a CPU pipeline runs), those threads wait
for a scheduler slice, and a message posted long before its receive is waited on still lands
milliseconds late: 3 to 6 ms for a 256 KiB activation, up to 24 ms in one 1F1B step, measured with
``bench/pipeline_vs_torch.py``. Here the sender copies the payload into a shared-memory slot in its
own thread and sends only the 2 KiB header through the process group, which one socket write
takes whole. NCCL does the same inside a node (its SHM transport); torch.distributed has no
shared-memory point-to-point for CPU tensors.

A slot is a file in ``/dev/shm`` mapped by both ranks; the receiver unlinks it once mapped, so a
killed process leaves behind at most the slots of messages nobody received. Slots are reused without any
shared flag: a message's header send completes only once the receiver has posted that receive,
and a receiver posts a channel's next receive only after it copied the previous payload out (see
``Transport.post_recv``). So when message k's header send has completed, every slot holding a
message before k is free.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .distributed import at_shutdown, to_global
from .errors import PipelineError, ProtocolError
from .transport import DistTransport
from .wire import HEADER_SLOTS, MAX_PAYLOAD, ROUTE, Structure, decode_header, decode_payload, encode

ROOT = "/dev/shm"
MAX_SLOTS = 256  # per channel; more messages in flight than this go through the process group
_INLINE = -1  # route: the payload follows through the process group (no slot was available)
_ALIGN = 1 << 16  # slot sizes are rounded up, so a slightly longer sequence reuses the slot


@dataclass
class _Slot:
    gen: int  # bumped when the slot is replaced by a larger one (a new file)
    size: int
    mm: mmap.mmap
    buf: torch.Tensor
    last_seq: int = -1  # sequence number of the last message written here


@dataclass
class _Ring:
    """The slots of one outgoing channel, and which messages the receiver has consumed."""

    slots: list[_Slot] = field(default_factory=list)
    seq: int = 0  # the next message's sequence number
    consumed: int = 0  # messages with a smaller sequence number have been copied out
    headers: deque[tuple[int, Any]] = field(default_factory=deque)  # (seq, send work) in order


def host_key() -> int:
    """An id of this machine's running kernel: equal on two ranks iff they can share /dev/shm
    (checked again at setup with a probe file, since containers may not share it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    digest = hashlib.sha256(f"{socket.gethostname()}|{boot}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ShmTransport(DistTransport):
    """:class:`DistTransport` whose payloads travel through shared memory (ranks on one host)."""

    def __init__(self, group: Any, describe_rank: Any, prefix: str) -> None:
        super().__init__(group, describe_rank, torch.device("cpu"))
        self.prefix = prefix  # every slot file's path starts with it
        self._rings: dict[int, _Ring] = {}
        self._mapped: dict[tuple[int, int, int], tuple[int, mmap.mmap, torch.Tensor]] = {}
        self._created: set[str] = set()
        # Slot files nobody mapped are removed once every rank has stopped sending and receiving.
        # In a group the caller owns there is no such moment: then they stay (only a failed run
        # leaves any, since a receiver unlinks each slot it maps).
        at_shutdown(self.close)

    # -- sending ---------------------------------------------------------------------------
    def send(self, tensors: list[torch.Tensor], structure: Structure, dst: int, tag: int, channel: int) -> None:
        header, payload = encode(tensors, structure)
        n = payload.numel()
        ring = self._rings.setdefault(channel, _Ring())
        index = self._slot_for(ring, channel, n) if n else _INLINE
        if index != _INLINE:
            slot = ring.slots[index]
            slot.buf[:n].copy_(payload)
            slot.last_seq = ring.seq
            header[ROUTE : ROUTE + 3] = torch.tensor([index, slot.gen, slot.size])
        else:
            header[ROUTE : ROUTE + 3] = torch.tensor([_INLINE, 0, 0])
        peer = to_global(self.group, dst)
        try:
            work = dist.isend(header, peer, group=self.group, tag=3 * tag)
            self._pending.append((work, header))
            ring.headers.append((ring.seq, work))
            if index == _INLINE and n:
                self._pending.append((dist.isend(payload, peer, group=self.group, tag=3 * tag + 1), payload))
        except RuntimeError as e:
            raise self._lost(dst, "sending to", e) from None
        ring.seq += 1

    def _slot_for(self, ring: _Ring, channel: int, n: int) -> int:
        """A free slot of at least ``n`` bytes (made or enlarged if needed), or _INLINE."""
        while ring.headers and ring.headers[0][1].is_completed():
            ring.consumed = max(ring.consumed, ring.headers.popleft()[0])
        free = [i for i, s in enumerate(ring.slots) if s.last_seq < ring.consumed]
        fits = [i for i in free if ring.slots[i].size >= n]
        try:
            if fits:
                return fits[0]
            if free:  # replace a free slot that is too small by a larger one
                i = free[0]
                ring.slots[i] = self._create(channel, i, ring.slots[i].gen + 1, n)
                return i
            if len(ring.slots) < MAX_SLOTS:
                ring.slots.append(self._create(channel, len(ring.slots), 0, n))
                return len(ring.slots) - 1
        except OSError:  # /dev/shm full or gone: this message goes through the process group
            pass
        return _INLINE

    def _path(self, src: int, channel: int, index: int, gen: int) -> str:
        return f"{self.prefix}-{src}-{channel}-{index}-{gen}"

    def _create(self, channel: int, index: int, gen: int, n: int) -> _Slot:
        size = max(_ALIGN, -(-n // _ALIGN) * _ALIGN)
        path = self._path(self.rank, channel, index, gen)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._created.add(path)
        try:
            os.posix_fallocate(fd, 0, size)  # reserve now: a full /dev/shm is an error here, not a SIGBUS later
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return _Slot(gen, size, mm, torch.frombuffer(mm, dtype=torch.uint8))

    # -- receiving -------------------------------------------------------------------------
    def post_recv(self, src: int, tag: int, channel: int) -> Any:
        header = torch.empty(HEADER_SLOTS, dtype=torch.int64)
        try:
            work = dist.irecv(header, to_global(self.group, src), group=self.group, tag=3 * tag)
        except RuntimeError as e:
            raise self._lost(src, "receiving from", e) from None
        return (src, tag, channel, header, work)

    def wait_recv(self, handle: Any) -> tuple[list[torch.Tensor], Structure]:
        src, tag, channel, header, work = handle
        try:
            work.wait()
            meta = decode_header(header, self._describe(src))
            index, gen, size = (int(v) for v in header[ROUTE : ROUTE + 3])
            if meta.nbytes == 0:
                payload = torch.empty(0, dtype=torch.uint8)
            elif index == _INLINE:
                payload = torch.empty(meta.nbytes, dtype=torch.uint8)
                dist.recv(payload, to_global(self.group, src), group=self.group, tag=3 * tag + 1)
            else:
                payload = self._slot_view(src, channel, index, gen, size, meta.nbytes)[: meta.nbytes].clone()
        except PipelineError:  # a malformed message: not a lost peer
            raise
        except RuntimeError as e:
            raise self._lost(src, "receiving from", e) from None
        return decode_payload(meta, payload), meta.structure

    def _slot_view(self, src: int, channel: int, index: int, gen: int, size: int, nbytes: int) -> torch.Tensor:
        if not (0 <= index < MAX_SLOTS and gen >= 0 and nbytes <= size <= MAX_PAYLOAD):
            raise ProtocolError(
                f"{self._describe(src)} sent an invalid shared-memory route (slot {index}, "
                f"generation {gen}, {size} bytes for a {nbytes}-byte payload)"
            )
        key = (src, channel, index)
        have = self._mapped.get(key)
        if have is not None and have[0] == gen:
            return have[2]
        path = self._path(src, channel, index, gen)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise ProtocolError(
                f"{self._describe(src)} named a shared-memory slot this rank cannot open ({path}: "
                f"{e.strerror}); are both ranks on one host with one /dev/shm? "
                "Pass Pipeline(transport='dist') to send everything through the process group"
            ) from None
        try:
            if os.fstat(fd).st_size < size:
                raise ProtocolError(f"{self._describe(src)} named a shared-memory slot smaller than its message")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        os.unlink(path)  # both ranks hold it mapped now; nothing is left behind if one dies
        view = torch.frombuffer(mm, dtype=torch.uint8)
        self._mapped[key] = (gen, mm, view)
        return view

    def close(self) -> None:
        """Remove the slot files this rank made that no receiver mapped (and unlinked)."""
        for path in list(self._created):
            try:
                os.unlink(path)
            except OSError:
                pass
        self._created.clear()


def make_transport(kind: str, group: Any, describe_rank: Any, device: torch.device) -> DistTransport:
    """``"auto"``: shared memory when every rank of ``group`` is on this host and tensors are on the
    CPU, else the process group alone (``"dist"``). ``"shm"`` insists on shared memory. Collective:
    every rank of the group calls it."""
    if kind not in ("auto", "shm", "dist"):
        raise ValueError(f"transport must be 'auto', 'shm' or 'dist', got {kind!r}")
    if kind == "dist" or device.type != "cpu":
        if kind == "shm":
            raise ValueError(f"transport='shm' needs CPU tensors, the pipeline runs on {device}")
        return DistTransport(group, describe_rank, device)
    prefix = _shared_prefix(group)
    if prefix is None:
        if kind == "shm":
            raise ValueError(
                "transport='shm' needs every rank on one host sharing /dev/shm; they do not: "
                "use transport='auto' or 'dist'"
            )
        return DistTransport(group, describe_rank, device)
    return ShmTransport(group, describe_rank, prefix)


def _shared_prefix(group: Any) -> str | None:
    """A path prefix in /dev/shm under which every rank of ``group`` sees the same files, or
    None. Collective."""
    size = dist.get_world_size(group)
    keys = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(keys, torch.tensor([host_key() if os.path.isdir(ROOT) else -1]), group=group)
    if len({int(k) for k in keys}) != 1 or int(keys[0]) < 0:
        return None
    token = torch.tensor([int.from_bytes(os.urandom(8), "little") >> 2], dtype=torch.int64)
    dist.broadcast(token, to_global(group, 0), group=group)
    # Under layerwise.launch the name starts with the run's, so the launcher can remove what a
    # failed rank left behind.
    run = os.path.basename(os.environ.get("LAYERWISE_STATE_DIR", "layerwise"))
    prefix = os.path.join(ROOT, f"{run}-{int(token):016x}")
    probe = f"{prefix}-probe"
    ok = torch.ones(1, dtype=torch.int64)
    if dist.get_rank(group) == 0:
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except OSError:
            ok[0] = 0
    dist.barrier(group=group)
    if not os.path.exists(probe):
        ok[0] = 0
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    dist.barrier(group=group)  # everyone looked before the probe goes
    if dist.get_rank(group) == 0:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return prefix if int(ok) == 1 else None

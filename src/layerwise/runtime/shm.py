"""Stage-boundary messages between ranks on one host: shared memory and pipes, no gloo threads.

Why by hand: gloo moves every point-to-point message through background threads on both
processes (a receive-ready notice one way, the data the other). When every core runs a stage (one
process per core, as a CPU pipeline runs), those threads wait for a scheduler slice, so a message
posted long before its receive is waited on still lands late: 0.4 ms at best, 3 to 6 ms at times
(up to 24 ms in one 1F1B step), measured with ``bench/pipeline_vs_torch.py``. torch.distributed
has no shared-memory point-to-point for CPU tensors; NCCL does this inside a node (its SHM
transport).

Here each channel (one stage boundary, one direction) between two ranks has:

- **slots**: files in ``/dev/shm`` mapped by both ranks. The sender copies the payload into a free
  slot in its own thread. The receiver unlinks a slot once mapped, so a killed process leaves at
  most the slots of messages nobody received (and ``layerwise.launch`` removes those).
- **a pipe** (FIFO) carrying the 2 KiB header, which names the slot. The kernel wakes the waiting
  receiver at once; a write of up to 4 KiB is atomic. A peer that dies closes its end: the other
  side sees it at once instead of at a timeout.
- **an acknowledgement pipe** back, one byte per message copied out, telling the sender which
  slots are free again. Pipes also order the memory accesses: no shared flags, no busy waiting.

Payloads that get no slot (``/dev/shm`` full) go through the process group instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import select
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .distributed import at_shutdown, to_global
from .errors import PeerLostError, ProtocolError
from .executor import channel_of
from .transport import DistTransport
from .wire import HEADER_SLOTS, MAX_PAYLOAD, ROUTE, Structure, decode_header, decode_payload, encode

ROOT = "/dev/shm"
MAX_SLOTS = 256  # per channel; more messages in flight than this go through the process group
_INLINE = -1  # route: the payload follows through the process group (no slot was available)
_ALIGN = 1 << 16  # slot sizes are rounded up, so a slightly longer sequence reuses the slot
_HEADER_BYTES = HEADER_SLOTS * 8
_PIPE_BYTES = 1 << 20  # room for 512 unread headers on a channel (Linux's default cap is 1 MiB)
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, missing from older Pythons' fcntl


@dataclass
class _Slot:
    gen: int  # bumped when the slot is replaced by a larger one (a new file)
    size: int
    mm: mmap.mmap
    buf: torch.Tensor
    last_seq: int = -1  # sequence number of the last message written here


@dataclass
class _Ring:
    """The slots of one outgoing channel, and how many of its messages the receiver copied out."""

    slots: list[_Slot] = field(default_factory=list)
    seq: int = 0  # the next message's sequence number
    consumed: int = 0  # acknowledged messages: those with a smaller sequence number are free


@dataclass(frozen=True)
class Channel:
    """Messages from rank ``src`` to rank ``dst`` (group ranks) on channel ``channel``."""

    src: int
    dst: int
    channel: int


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
    """Payloads in shared memory, headers and acknowledgements through pipes (ranks on one host).

    The process group remains for the inline fallback; built by :func:`make_transport`.
    """

    def __init__(self, group: Any, describe_rank: Any, prefix: str, timeout: float) -> None:
        super().__init__(group, describe_rank, torch.device("cpu"))
        self.prefix = prefix  # every file's path starts with it
        self.timeout = timeout  # seconds a wait for a peer may take before it counts as hung
        self._rings: dict[int, _Ring] = {}
        self._mapped: dict[tuple[int, int, int], tuple[int, mmap.mmap, torch.Tensor]] = {}
        self._created: set[str] = set()
        self._head_out: dict[int, int] = {}  # channel -> write end of its header pipe
        self._head_in: dict[int, int] = {}  # channel -> read end
        self._ack_out: dict[int, int] = {}  # channel (received here) -> write end of its ack pipe
        self._ack_in: dict[int, int] = {}  # channel (sent from here) -> read end
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
            header[ROUTE:] = torch.tensor([index, slot.gen, slot.size, tag])
        else:
            header[ROUTE:] = torch.tensor([_INLINE, 0, 0, tag])
        ring.seq += 1
        self._write(self._head_out[channel], header.numpy().tobytes(), dst)
        if index == _INLINE and n:
            peer = to_global(self.group, dst)
            try:
                self._pending.append((dist.isend(payload, peer, group=self.group, tag=3 * tag + 1), payload))
            except RuntimeError as e:
                raise self._lost(dst, "sending to", e) from None

    def _write(self, fd: int, data: bytes, peer: int) -> None:
        """Write all of ``data``; waits (bounded by the timeout) only if the pipe is full."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                if not _ready(fd, select.POLLOUT, self.timeout):
                    raise self._peer_error(peer, "sending to", "it read nothing for the timeout") from None
            except BrokenPipeError:
                raise self._peer_error(peer, "sending to", "it closed its end: it exited or died") from None

    def _slot_for(self, ring: _Ring, channel: int, n: int) -> int:
        """A free slot of at least ``n`` bytes (made or enlarged if needed), or _INLINE."""
        ring.consumed += _drain(self._ack_in.get(channel))
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
        return (src, tag, channel)  # the header pipe needs nothing posted: the kernel buffers it

    def wait_recv(self, handle: Any) -> tuple[list[torch.Tensor], Structure]:
        src, tag, channel = handle
        raw = self._read_header(self._head_in[channel], src)
        header = torch.frombuffer(bytearray(raw), dtype=torch.int64)
        meta = decode_header(header, self._describe(src))
        index, gen, size, sent_tag = (int(v) for v in header[ROUTE:])
        if sent_tag != tag:
            raise ProtocolError(
                f"{self._describe(src)} sent message {sent_tag} where this rank expected {tag}: the "
                "ranks run different schedules (same schedule, microbatches and layerwise version?)"
            )
        if meta.nbytes == 0:
            payload = torch.empty(0, dtype=torch.uint8)
        elif index == _INLINE:
            payload = torch.empty(meta.nbytes, dtype=torch.uint8)
            try:
                dist.recv(payload, to_global(self.group, src), group=self.group, tag=3 * tag + 1)
            except RuntimeError as e:
                raise self._lost(src, "receiving from", e) from None
        else:
            payload = self._slot_view(src, channel, index, gen, size, meta.nbytes)[: meta.nbytes].clone()
        with contextlib.suppress(OSError):  # the sender may be gone; its slots no longer matter
            os.write(self._ack_out[channel], b"\x01")
        return decode_payload(meta, payload), meta.structure

    def _read_header(self, fd: int, src: int) -> bytes:
        got = b""
        while len(got) < _HEADER_BYTES:
            if not _ready(fd, select.POLLIN, self.timeout):
                raise self._peer_error(src, "receiving from", f"nothing came for {self.timeout:g} s") from None
            try:
                chunk = os.read(fd, _HEADER_BYTES - len(got))
            except BlockingIOError:
                continue
            if not chunk:
                raise self._peer_error(src, "receiving from", "it closed its end: it exited or died") from None
            got += chunk
        return got

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
        with contextlib.suppress(OSError):  # both ranks hold it mapped now: nothing is left if one dies
            os.unlink(path)
        view = torch.frombuffer(mm, dtype=torch.uint8)
        self._mapped[key] = (gen, mm, view)
        return view

    def _peer_error(self, peer: int, doing: str, why: str) -> PeerLostError:
        return self._lost(peer, doing, RuntimeError(why))

    def close(self) -> None:
        """Remove the slot files this rank made that no receiver mapped (and unlinked)."""
        for path in list(self._created):
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._created.clear()


def _ready(fd: int, event: int, timeout: float) -> bool:
    """Wait until ``fd`` is ready for ``event`` or its peer closed it; False after ``timeout``.
    (poll, not select: select fails for descriptors above 1024.)"""
    p = select.poll()
    p.register(fd, event)
    return bool(p.poll(max(0, int(timeout * 1000))))


def _drain(fd: int | None) -> int:
    """Bytes waiting in a non-blocking pipe (each one acknowledges a message), read now."""
    total = 0
    while fd is not None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        total += len(chunk)
    return total


def make_transport(
    kind: str, group: Any, describe_rank: Any, device: torch.device, channels: Sequence[Channel] = (), timeout: float = 60.0
) -> DistTransport:
    """``"auto"``: shared memory when every rank of ``group`` is on this host and tensors are on the
    CPU, else the process group alone (``"dist"``). ``"shm"`` insists on shared memory.
    ``channels`` are every channel the ranks will use. Collective: every rank of the group calls it."""
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
    t = ShmTransport(group, describe_rank, prefix, timeout)
    _open_pipes(t, group, channels)
    return t


def _open_pipes(t: ShmTransport, group: Any, channels: Sequence[Channel]) -> None:
    """Make and open every channel's header and acknowledgement pipes. Readers open first (a
    non-blocking writer cannot open a FIFO nobody reads); once all are open the names go."""
    me = dist.get_rank(group)
    mine = [c for c in channels if me in (c.src, c.dst)]

    def path(c: Channel, what: str) -> str:
        return f"{t.prefix}-{what}-{c.src}-{c.dst}-{c.channel}"

    for c in mine:  # each end reads one of the two pipes: it makes it
        name = path(c, "head") if me == c.dst else path(c, "ack")
        os.mkfifo(name, 0o600)
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
        (t._head_in if me == c.dst else t._ack_in)[c.channel] = fd
    dist.barrier(group=group)
    for c in mine:
        fd = os.open(path(c, "head") if me == c.src else path(c, "ack"), os.O_WRONLY | os.O_NONBLOCK)
        with contextlib.suppress(OSError):  # a larger buffer is an optimization, not a need
            fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)
        (t._head_out if me == c.src else t._ack_out)[c.channel] = fd
    dist.barrier(group=group)
    for c in mine:
        with contextlib.suppress(OSError):
            os.unlink(path(c, "head") if me == c.dst else path(c, "ack"))


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
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return prefix if int(ok) == 1 else None


def channels(stage_to_rank: Sequence[int]) -> list[Channel]:
    """Every channel between two ranks: each boundary's activations forward, gradients back."""
    out = []
    for s in range(len(stage_to_rank) - 1):
        a, b = stage_to_rank[s], stage_to_rank[s + 1]
        if a != b:
            out += [Channel(a, b, channel_of(s, True)), Channel(b, a, channel_of(s + 1, False))]
    return out

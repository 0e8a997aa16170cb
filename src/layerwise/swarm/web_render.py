"""The status page's body, as HTML, from what :class:`~layerwise.swarm.status.StatusProbe` returns.

Pure (no zenoh, no torch): every value comes from the network (peer names, failure reasons,
certificate names), so every one of them goes through :func:`_e` (``html.escape``) before it
reaches the page, numbers included. Keys that another part of the swarm may not report (yet) are
shown as "—" rather than failing: ``refused``, ``rejected``, ``bans``, and per peer ``identity``
and ``probation``.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

DASH = "—"
COLORS = {"forward": "#4e79a7", "backward": "#f28e2b", "commit": "#59a14f", "backup_apply": "#9c9c9c"}
LABELS = {"forward": "F", "backward": "B", "commit": "C", "backup_apply": "S"}


def _e(value: Any) -> str:
    return html.escape(DASH if value is None else str(value), quote=True)


def _num(value: Any, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return DASH
    return f"{value * scale:{fmt}}{unit}"


def _slug(text: str) -> str:
    return re.sub(r"\W+", "-", text)


def _clock(at: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if isinstance(at, (int, float)) else DASH


def _table(title: str, rows: Sequence[Sequence[str]], head: Sequence[str], css: str = "") -> str:
    """``rows`` hold escaped HTML already; an empty table says so instead of showing nothing."""
    out = [f'<section class="{css}"><h2>{_e(title)} <span class="n">({len(rows)})</span></h2>']
    if not rows:
        return out[0] + '<p class="none">none</p></section>'
    out.append("<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>")
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows]
    return "".join(out) + "</tbody></table></section>"


def _items(value: Any) -> list[Mapping[str, Any]]:
    """A list of records; a bare string or number (an older trainer's format) becomes ``{"name": it}``."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        value = [value]
    return [v if isinstance(v, Mapping) else {"name": v} for v in value]


def render(got: Mapping[str, Any], error: str | None = None) -> str:
    tr = got.get("trainer") or {}
    parts = [_summary(got, tr, error)]
    if tr.get("losses"):
        parts.append(_sparkline(tr["losses"]))
    parts.append(_peers(got, tr))
    parts.append(_stages(tr))
    parts.append(_timeline(tr.get("timeline")))
    parts.append(_failures(tr.get("failures")))
    parts.append(_trust(tr))
    return "\n".join(parts)


def _summary(got: Mapping[str, Any], tr: Mapping[str, Any], error: str | None) -> str:
    warn = f'<p class="error">{_e(error)}</p>' if error else ""
    if not tr:
        trainer = '<p class="none" id="no-trainer">no trainer is running</p>'
    else:
        cells = [("step", _e(tr.get("step"))), ("loss", _num(tr.get("loss"), ".4f")),
                 ("steps/s", _num(tr.get("steps_per_s"), ".2f")), ("tokens/s", _num(tr.get("tokens_per_s"), ",.0f")),
                 ("epoch", _e(tr.get("epoch"))), ("phase", _e(tr.get("phase"))),
                 ("rebalances", _e(tr.get("rebalances"))), ("certificate", _e(tr.get("identity"))),
                 ("spot checks", _spot(tr.get("spot_checks"), tr.get("spot_check_rate"))),
                 ("sent", _num(tr.get("bytes_sent"), ".1f", 1 / 2**20, " MiB")),
                 ("received", _num(tr.get("bytes_received"), ".1f", 1 / 2**20, " MiB"))]  # fmt: skip
        trainer = '<div class="cards">' + "".join(
            f'<div class="card"><div class="k">{_e(k)}</div><div class="v" id="t-{_slug(k)}">{v}</div></div>'
            for k, v in cells
        ) + "</div>"  # fmt: skip
    return (f'<header><h1>swarm <span id="swarm-name">{_e(got.get("swarm"))}</span></h1>'
            f'<span class="at">polled {_clock(got.get("at"))}</span></header>{warn}{trainer}')  # fmt: skip


def _spot(stats: Any, rate: Any) -> str:
    """How many spot checks ran and how many disagreed, e.g. ``41 (2 bad) at 5%``."""
    if not isinstance(stats, Mapping):
        return DASH
    at = f" at {rate:.0%}" if isinstance(rate, (int, float)) else ""
    return _e(f"{stats.get('checks', 0)} ({stats.get('mismatches', 0)} bad){at}")


def _sparkline(losses: Sequence[Any], w: int = 600, h: int = 60) -> str:
    ys = [float(v) for v in losses if isinstance(v, (int, float))]
    if len(ys) < 2:
        return ""
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    dx = (w - 8) / (len(ys) - 1)
    pts = " ".join(f"{4 + i * dx:.1f},{4 + (hi - y) * (h - 8) / span:.1f}" for i, y in enumerate(ys))
    return (f'<section><h2>loss, last {len(ys)} steps <span class="n">({ys[0]:.3f} → {ys[-1]:.3f})</span></h2>'
            f'<svg class="spark" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">'
            f'<polyline fill="none" stroke="#4e79a7" stroke-width="1.5" points="{pts}"/></svg></section>')  # fmt: skip


def _roles(tr: Mapping[str, Any]) -> dict[str, list[str]]:
    roles: dict[str, list[str]] = {}
    for s in tr.get("stages") or []:
        roles.setdefault(str(s.get("holder")), []).append(f"holds stage {s.get('stage')}")
        if s.get("copy") is not None:
            roles.setdefault(str(s.get("copy")), []).append(f"copy of stage {s.get('stage')}")
    return roles


def _peers(got: Mapping[str, Any], tr: Mapping[str, Any]) -> str:
    own: Mapping[str, Any] = got.get("peers") or {}
    seen: Mapping[str, Any] = tr.get("peers") or {}
    roles = _roles(tr)
    failed = {str(f.get("peer")) for f in _items(tr.get("failures"))}
    rows = []
    for name in sorted(set(own) | set(seen)):
        mine, theirs = (v if isinstance(v, Mapping) else {} for v in (own.get(name), seen.get(name)))
        memory = theirs.get("memory_bytes", mine.get("memory_bytes"))
        probation = theirs.get("probation")
        if theirs.get("banned"):
            state = '<span class="bad">banned</span>'
        elif "error" in mine:
            state = f'<span class="bad" title="{_e(mine["error"])}">not answering</span>'
        else:
            state = "failed" if name in failed else "live"
        rows.append([f'<span class="peer">{_e(name)}</span>', _e(theirs.get("identity")),
                     _num(theirs.get("block_s"), ".1f", 1000, " ms"), _num(memory, ".2f", 1 / 2**30, " GiB"),
                     _e(mine.get("speed")), _e(", ".join(roles.get(name, [])) or "spare"),
                     _e(mine.get("served")), _e(DASH if probation is None else ("yes" if probation else "no")),
                     state])  # fmt: skip
    head = ["peer", "certificate", "block time", "memory", "speed", "role", "served", "probation", "state"]
    return _table("peers", rows, head, "peers")


def _stages(tr: Mapping[str, Any]) -> str:
    rows = []
    for s in tr.get("stages") or []:
        layers = s.get("layers") or [None, None]
        replicas = ", ".join(_e(r) for r in s.get("replicas") or []) or "—"
        rows.append([_e(s.get("stage")), f"{_e(layers[0])}–{_e(layers[-1])}", _e(s.get("holder")), replicas,
                     _e(s.get("copy"))])  # fmt: skip
    return _table("stages", rows, ["stage", "layers", "holder", "replicas (split its microbatches)", "copy"], "stages")


def _timeline(tl: Mapping[str, Any] | None, w: int = 900, row: int = 24) -> str:
    if not tl or not tl.get("actions"):
        return '<section><h2>last step</h2><p class="none">no step finished yet</p></section>'
    timed = lambda a: all(isinstance(a.get(k), (int, float)) for k in ("start", "end"))  # noqa: E731
    acts = [a for a in tl["actions"] if isinstance(a, Mapping) and timed(a)]
    total = max([float(tl.get("seconds") or 0.0)] + [a["end"] for a in acts]) or 1e-3
    stages = sorted({int(a.get("stage", 0)) for a in acts})
    left, top = 70, 18
    height = top + row * len(stages) + 4
    x = lambda t: left + (w - left - 30) * t / total  # noqa: E731 (room on the right for the last tick)
    out = [f'<svg class="gantt" viewBox="0 0 {w} {height}" width="{w}" height="{height}" role="img">']
    for i in range(6):  # time axis: 0, 20, ..., 100% of the step
        t = total * i / 5
        out.append(f'<line x1="{x(t):.1f}" y1="{top - 4}" x2="{x(t):.1f}" y2="{height}" stroke="#ddd"/>'
                   f'<text x="{x(t):.1f}" y="{top - 6}" class="tick">{t * 1000:.0f} ms</text>')  # fmt: skip
    for r, s in enumerate(stages):
        y = top + r * row
        out.append(f'<text x="4" y="{y + row * 0.65:.1f}" class="lane">stage {_e(s)}</text>')
        for a in (a for a in acts if int(a.get("stage", 0)) == s):
            kind = str(a.get("kind"))
            relay = kind == "backup_apply"  # the copy's update: drawn thin, below the holder's bar
            x0, x1 = x(a["start"]), max(x(a["end"]), x(a["start"]) + 1)
            y0, hh = (y + row - 8, 5) if relay else (y + 3, row - 10)
            mb = a.get("mb")
            label = LABELS.get(kind, "?") + (str(mb) if isinstance(mb, int) and mb >= 0 else "")
            tip = f"{kind} mb {mb} on {a.get('peer')}: {(a['end'] - a['start']) * 1000:.1f} ms"
            out.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{hh}" '
                       f'fill="{COLORS.get(kind, "#b07aa1")}"><title>{_e(tip)}</title></rect>')  # fmt: skip
            if not relay and x1 - x0 > 8 * len(label):
                out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{y0 + hh - 4:.1f}" class="bar">{_e(label)}</text>')
    out.append("</svg>")
    legend = " ".join(f'<span class="key" style="background:{c}"></span>{_e(k)}' for k, c in COLORS.items())
    return (f'<section><h2>last step <span class="n">(step {_e(tl.get("step"))}, {total * 1000:.0f} ms)</span></h2>'
            f'{"".join(out)}<p class="legend">{legend}</p></section>')  # fmt: skip


def _failures(failures: Any) -> str:
    rows = []
    for f in reversed(_items(failures)):
        start = f.get("left_at") if f.get("left_at") is not None else f.get("noticed_at")
        rec = f.get("recovered_at")
        took = rec - start if isinstance(rec, (int, float)) and isinstance(start, (int, float)) else None
        stages = f.get("stages")
        rows.append([f'<span class="peer">{_e(f.get("peer"))}</span>', _e(f.get("step")), _e(", ".join(f.get("phases") or [str(f.get("phase"))])),
                     _e(", ".join(map(str, stages)) if isinstance(stages, list) else stages), _clock(start),
                     _num(took, ".2f", unit=" s") if rec is not None else "not yet"])  # fmt: skip
    return _table("recent failures", rows, ["peer", "step", "phase", "stages", "at", "recovered in"], "failures")


def _column(items: Iterable[Mapping[str, Any]], keys: Sequence[str],
            fmt: Mapping[str, Callable[[Any], str]]) -> list[list[str]]:  # fmt: skip
    return [[fmt.get(k, _e)(it.get(k)) for k in keys] for it in items]


def _trust(tr: Mapping[str, Any]) -> str:
    """Refused processes, rejected messages and bans: "—" when the trainer does not report them."""
    parts = []
    for key, title, cols in (("refused", "refused processes", ("name", "why", "by", "at")),
                             ("bans", "bans", ("peer", "reason", "step"))):  # fmt: skip
        if key not in tr:
            parts.append(f'<section class="{key}"><h2>{_e(title)}</h2><p class="none">{DASH}</p></section>')
        else:
            parts.append(_table(title, _column(_items(tr[key]), cols, {"at": _clock}), cols, key))
    rejected = tr.get("rejected")
    if not isinstance(rejected, Mapping):
        parts.append(f'<section class="rejected"><h2>rejected messages</h2><p class="none">{DASH}</p></section>')
    else:
        rows = [[_e(reason), _e(count)] for reason, count in sorted(rejected.items(), key=lambda kv: str(kv[0]))]
        parts.append(_table("rejected messages", rows, ["reason", "count"], "rejected"))
    return '<div class="trust">' + "".join(parts) + "</div>"

"""Swarm trust on this machine: mTLS overhead, spot checks against a corrupting peer, compression.

    python bench/swarm_trust.py [--quick] [--only mtls,mtls_micro,spot,compress,compress_loss]

Each section lives in ``bench/trust/<section>.py`` and exposes ``run(quick: bool) -> dict``:
- ``mtls``: ``mtls_overhead`` (step time with mutual TLS over step time without), with the CPU
  per step and the round trip of each request kind of both swarms;
- ``mtls_micro``: one request and its reply by size over plain TCP and mutual TLS, with and
  without the access layer: round trip and CPU (where mTLS costs time: per message or per byte);
- ``spot``: a peer with ``--fault corrupt:0.05`` under 5% spot checks: ``detection_rate``,
  ``steps_to_ban``, ``overhead`` (extra step time, relative);
- ``compress``: per compression mode ``bytes_ratio`` (bytes on the wire) and the step time at
  100 Mbit/s, 50 ms; ``compress_loss``: per mode ``loss_change`` (mean over seeds, with its spread).

Writes ``bench/results/swarm_trust.json`` (sections merged into one object) and prints a table.
Timings on a shared 2-core machine are noisy: compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

SECTIONS = ("mtls", "mtls_micro", "spot", "compress", "compress_loss")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny runs, for the smoke test")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "swarm_trust.json"))
    args = ap.parse_args(argv)
    wanted = [s for s in args.only.split(",") if s]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    for name in wanted:
        module = importlib.import_module(f"trust.{name}")
        result[name] = module.run(quick=args.quick)
        print(f"[{name}]")
        for key, value in result[name].items():
            if not isinstance(value, (dict, list)):
                print(f"  {key:<28} {value}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``layerwise swarm status --web``, loaded in a real headless Chromium while a local swarm trains.

One swarm for the module: a seed, three peer processes (one of them with HTML in its name, which
comes back from the network and must show as text), a trainer training in a background thread,
and the status page as its own ``layerwise swarm status --web 0`` process. Chromium is Debian's
(``apt-get install chromium``; ``.ci/run`` installs it), driven by Playwright for Python. The page
must show the peers and the last step's timeline, then, with no reload, show the failure of a
killed peer and drop it from the peer list.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from layerwise.commands.swarm import format_status
from layerwise.swarm.local import LocalPeers
from layerwise.swarm.spec import SwarmSpec
from layerwise.swarm.status import query_status
from layerwise.swarm.trainer import Trainer, TrainerOptions

from .test_swarm import _free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
SPEC = SwarmSpec(width=32, heads=2, blocks=4, seq=16, batch_size=8, microbatches=4)
HOSTILE = "x<b>y&z"  # a peer name with markup in it: the page must print it, not interpret it
PEERS = ["alpha", "bravo", HOSTILE]
CHROMIUM = next((p for p in (os.environ.get("LAYERWISE_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)  # fmt: skip
WAIT_MS = 90_000  # the longest a page change may take: peers start and the trainer measures them
SRC = str(Path(__file__).resolve().parents[2] / "src")


class _Stop(Exception):
    pass


def _page_url(proc: subprocess.Popen[str], timeout: float) -> str:
    """The URL the status process prints once it listens (read in a thread: readline has no timeout)."""
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=1.0))
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if m := re.search(r"(http://\S+/)", seen[-1]):
            return m.group(1)
    raise AssertionError(f"the status page did not start within {timeout:.0f} s (exit code {proc.poll()}): "
                         f"{''.join(seen)[-2000:]}")  # fmt: skip


@pytest.fixture(scope="module")
def live() -> Iterator[dict[str, Any]]:
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (apt-get install chromium; .ci/run installs it as root)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    endpoint = f"tcp/127.0.0.1:{_free_port()}"
    name = f"web-{os.getpid()}"
    stop, errors, codes = threading.Event(), [], []
    status: subprocess.Popen[str] | None = None
    with LocalPeers(name, endpoint) as peers:
        peers.start_seed()
        for p in PEERS:
            peers.start(p)
        opts = TrainerOptions(swarm=name, join=(endpoint,), min_peers=len(PEERS), wait_s=120)
        with Trainer(SPEC, opts) as tr:

            def hook(tr: Trainer, step: int) -> None:
                if stop.is_set():
                    raise _Stop
                time.sleep(0.2)  # a live swarm, not a benchmark: leave CPU to the browser and the peers

            def train() -> None:
                try:
                    tr.train(100_000, hook)
                except _Stop:
                    pass
                except BaseException as e:
                    errors.append(e)

            thread = threading.Thread(target=train, daemon=True)
            thread.start()
            env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
            cmd = [sys.executable, "-m", "layerwise", "swarm", "status", "--swarm", name, "--join", endpoint,
                   "--web", "0"]  # fmt: skip
            try:
                status = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                yield {"url": _page_url(status, 60), "trainer": tr, "peers": peers, "errors": errors,
                       "swarm": name, "endpoint": endpoint}
            finally:
                stop.set()
                if status is not None:
                    status.terminate()
                    try:
                        codes.append(status.wait(10))
                    except subprocess.TimeoutExpired:
                        status.kill()
                        status.wait(10)
                thread.join(60)
    assert not thread.is_alive(), "the training thread did not stop"
    assert codes == [0], f"the status page did not stop cleanly on SIGTERM: {codes}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def test_the_page_shows_a_live_swarm_and_a_killed_peer(live: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.set_default_timeout(WAIT_MS)
    page.goto(live["url"])
    peers_table = page.locator("section.peers")
    for p in PEERS:  # the peers, each with its measured capacity, once the trainer has met them
        expect(peers_table).to_contain_text(p, timeout=WAIT_MS)
    expect(page.locator("svg.gantt rect").first).to_be_visible(timeout=WAIT_MS)  # a step finished: its timeline
    expect(page.locator("#t-step")).not_to_have_text("0", timeout=WAIT_MS)
    assert page.locator("section.peers b").count() == 0  # the hostile name is text, not markup
    assert "ms" in peers_table.inner_text() and "GiB" in peers_table.inner_text()
    assert page.locator("section.stages tbody tr").count() == len(live["trainer"].assignment.stages)
    expect(page.locator("section.failures")).to_contain_text("none", timeout=WAIT_MS)
    page.screenshot(path=str(tmp_path / "before.png"), full_page=True)
    got = query_status(live["swarm"], [live["endpoint"]])  # the plain `swarm status` sees the same swarm
    assert set(got["peers"]) == set(PEERS) and got["trainer"]["timeline"]["actions"]
    assert "no trainer" not in format_status(got)

    # kill a peer that holds a stage and is not the hostile one (its name is a substring-free check)
    victim = next(s.holder for s in live["trainer"].assignment.stages if s.holder != HOSTILE)
    refreshes = int(page.locator("body").get_attribute("data-refreshes") or 0)
    live["peers"].kill(victim)
    failures = page.locator("section.failures")
    expect(failures).to_contain_text(victim, timeout=WAIT_MS)  # no reload: the page's own polling brings it
    expect(peers_table).not_to_contain_text(victim, timeout=WAIT_MS)
    assert int(page.locator("body").get_attribute("data-refreshes") or 0) > refreshes
    expect(failures.locator("tbody tr")).to_have_count(1, timeout=WAIT_MS)
    shot = os.environ.get("LAYERWISE_WEB_SCREENSHOT")
    page.wait_for_timeout(3000)  # a couple of steps after the recovery, for the screenshot's timeline
    page.screenshot(path=shot or str(tmp_path / "after.png"), full_page=True)
    assert not live["errors"], f"training failed: {live['errors']!r}"
    assert live["trainer"].failures and live["trainer"].failures[0].peer == victim

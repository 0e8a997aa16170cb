"""The status page without a swarm: rendering (escaping, missing keys, the timeline), the HTTP
server's routes and headers, the step timeline, and the CLI's refusals of bad ``--web`` options."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from layerwise.cli import main
from layerwise.swarm.timeline import StepTimeline
from layerwise.swarm.web import StatusWeb
from layerwise.swarm.web_render import DASH, render

EVIL = '<script>alert("x")</script>&"\''


def _status(**trainer: Any) -> dict[str, Any]:
    base = {"swarm": "s", "step": 7, "epoch": 2, "phase": "step", "loss": 3.25, "steps_per_s": 4.0,
            "tokens_per_s": 512.0, "rebalances": 0, "bytes_sent": 2**20, "bytes_received": 2**21,
            "peers": {"a": {"block_s": 0.002, "memory_bytes": 2**31}},
            "stages": [{"stage": 0, "layers": [0, 2], "holder": "a", "copy": "b"}],
            "failures": [], "losses": [5.0, 4.0, 3.25]}  # fmt: skip
    return {"swarm": "s", "peers": {"a": {"speed": 1.0, "served": 12}, "b": {"speed": 0.5}}, "trainer": base | trainer,
            "at": time.time()}  # fmt: skip


def _text(fragment: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment))


def test_every_string_from_the_network_is_escaped() -> None:
    got = _status(peers={EVIL: {"block_s": 0.1, "memory_bytes": 1, "identity": EVIL}},
                  stages=[{"stage": EVIL, "layers": [EVIL, EVIL], "holder": EVIL, "copy": EVIL, "replicas": [EVIL]}],
                  failures=[{"peer": EVIL, "step": EVIL, "phase": EVIL, "stages": [EVIL], "noticed_at": 1.0,
                             "left_at": None, "recovered_at": None}],
                  refused=[{"name": EVIL, "why": EVIL, "at": 1.0}], rejected={EVIL: EVIL},
                  bans=[{"peer": EVIL, "reason": EVIL, "step": EVIL}],
                  timeline={"step": EVIL, "seconds": 0.01, "actions": [
                      {"stage": 0, "kind": EVIL, "mb": EVIL, "peer": EVIL, "start": 0.0, "end": 0.01}]})  # fmt: skip
    got["peers"][EVIL] = {"error": EVIL, "speed": EVIL}
    got["swarm"] = EVIL
    page = render(got, error=EVIL)
    assert "<script" not in page and 'alert("x")' not in page
    assert page.count("&lt;script&gt;") >= 12  # each place shows it, as text
    assert "&amp;&quot;&#x27;" in page  # quotes too: values also go into attributes (title=...)


def test_missing_keys_show_a_dash_and_present_ones_their_rows() -> None:
    page = render(_status())  # a trainer that reports no trust keys yet
    for section in ("refused", "bans", "rejected"):
        assert re.search(rf'<section class="{section}"><h2>[^<]+</h2><p class="none">{DASH}</p>', page)
    assert "no step finished yet" in page and "spare" not in page
    row = re.search(r"<tr><td><span class=\"peer\">a</span>.*?</tr>", page)
    assert row and all(x in row.group(0) for x in ("2.0 ms", "2.00 GiB", "holds stage 0", "12", DASH))
    assert "copy of stage 0" in page and "3.2500" in page and "1.0 MiB" in page
    assert re.search(r'id="t-spot-checks">—<', page) and re.search(r'id="t-certificate">—<', page)
    page = render(_status(refused=[{"name": "mallory", "why": "revoked", "at": 0.0, "by": "p3"}, "eve"],
                          rejected={"nan": 3, "oversized": 1}, bans=[{"peer": "c", "reason": "spot check", "step": 9}],
                          peers={"a": {"identity": "peer-a", "probation": True}, "c": {"banned": True}},
                          identity="trainer-1", spot_checks={"checks": 41, "mismatches": 2}, spot_check_rate=0.05))
    text = _text(page)
    assert "refused processes (2)" in text and "mallory revoked p3" in text and "eve" in text
    assert "nan 3" in text and "bans (1)" in text and "c spot check 9" in text
    assert "peer-a" in text and "yes" in text and "banned" in text
    assert "trainer-1" in text and "41 (2 bad) at 5%" in text
    page = render(_status(stages=[{"stage": 0, "layers": [0, 2], "holder": "a", "copy": None, "replicas": ["r1", "r2"]}]))
    assert "r1, r2" in _text(page)  # the replicas that split stage 0's microbatches


def test_no_trainer_and_a_hung_peer() -> None:
    got = {"swarm": "s", "peers": {"h": {"error": "did not answer status within 2 s"}}, "trainer": None, "at": 0}
    page = render(got)
    assert 'id="no-trainer"' in page and "not answering" in page and "did not answer" in page


def test_the_timeline_draws_one_bar_per_request_in_its_stage_row() -> None:
    tl = StepTimeline()
    tl.begin(3)
    t0 = time.perf_counter()
    for s in range(2):
        tl.record(s, "forward", 0, f"p{s}", t0 + 0.01 * s, t0 + 0.01 * s + 0.005)
        tl.record(s, "backward", 0, f"p{s}", t0 + 0.03, t0 + 0.04)
    tl.record(0, "backup_apply", -1, "p1", t0 + 0.05, t0 + 0.06)
    assert tl.last() is None  # nothing finished yet
    tl.end()
    tl.begin(4)  # the next step's requests do not change what is shown
    tl.record(0, "forward", 1, "p0", t0, t0 + 1)
    last = tl.last()
    assert last is not None and last["step"] == 3 and len(last["actions"]) == 5
    assert all(0 <= a["start"] <= a["end"] for a in last["actions"])
    page = render(_status(timeline=last))
    svg = page[page.index('<svg class="gantt"') :]
    assert svg.count("<rect") == 5 and svg.count(">stage ") == 2 and "backup_apply mb -1 on p1" in svg
    assert "(step 3," in page


def _get(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def test_the_server_routes_and_keeps_polling_through_errors() -> None:
    calls = [0]

    def poll() -> dict[str, Any]:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("zenoh hiccup")
        return _status(step=calls[0])

    with StatusWeb(poll, port=0, interval_s=0.05) as web:
        assert web.url.startswith("http://127.0.0.1:")
        deadline = time.monotonic() + 10
        while web.polls < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert web.polls >= 4 and web.error is None  # the failed poll did not stop the loop
        code, head, page = _get(web.url)
        assert code == 200 and head["Content-Type"].startswith("text/html") and "script-src 'self'" in head[
            "Content-Security-Policy"]  # fmt: skip
        assert '<script src="page.js">' in page and "__BODY__" not in page and "peers" in page
        assert _get(web.url + "page.js")[2].count("fetch(") == 1
        assert '<section class="peers">' in _get(web.url + "fragment")[2]
        body = json.loads(_get(web.url + "status.json")[2])
        assert body["trainer"]["step"] >= 3 and body["error"] is None
        assert _get(web.url + "nope")[0] == 404


@pytest.mark.parametrize("args", [["--web-host", "0.0.0.0"], ["--web", "70000"], ["--web", "0", "--json"]])
def test_bad_web_options_are_one_error_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["swarm", "status", "--join", "tcp/127.0.0.1:1", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--web" in err and err.count("\n") == 1


def test_an_answer_the_page_cannot_show_is_reported_not_fatal() -> None:
    web = StatusWeb(lambda: {}, port=0)
    try:
        web.latest = {"swarm": "s", "peers": {"odd": ["<x>"]}, "trainer": {"stages": ["<not a stage>"]}}
        page = web.fragment()
        assert page.startswith('<p class="error">cannot show this status: AttributeError') and "<x>" not in page
    finally:
        web.httpd.server_close()

"""``layerwise swarm status --web PORT``: a live status page, served by the standard library.

A poller thread asks the swarm (:class:`~layerwise.swarm.status.StatusProbe`) every second and
keeps the latest answer; the HTTP threads only read it, so a slow or hung peer never blocks a
page load. Routes: ``/`` the page, ``/fragment`` its body (what the page's script fetches every
second), ``/status.json`` the raw status. The page is rendered on the server
(:mod:`.web_render`, every network string escaped), and a Content-Security-Policy that allows only
``page.js`` to run is the second line of defence should an escape ever be missed.
"""

from __future__ import annotations

import html
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any

from .web_render import render

if TYPE_CHECKING:
    from .status import StatusProbe

CSP = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:"


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


class StatusWeb:
    """Serve the page on ``host:port`` (0: any free port, see :attr:`url`) while ``poll`` feeds it."""

    def __init__(self, poll: Callable[[], dict[str, Any]], host: str = "127.0.0.1", port: int = 0,
                 interval_s: float = 1.0) -> None:  # fmt: skip
        self.poll, self.interval_s = poll, interval_s
        self.latest: dict[str, Any] = {"swarm": None, "peers": {}, "trainer": None}
        self.error: str | None = "waiting for the first answer from the swarm"
        self.polls = 0
        self._stop = threading.Event()
        self._page, self._script = _asset("web_page.html"), _asset("web_page.js")
        server = _Server6 if ":" in host else ThreadingHTTPServer
        self.httpd = server((host, port), self._handler())
        self.httpd.daemon_threads = True
        self._threads = [threading.Thread(target=self._poll_loop, name="status-poll", daemon=True),
                         threading.Thread(target=self.httpd.serve_forever, name="status-http", daemon=True)]

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in str(host) else f"http://{host}:{port}/"

    def start(self) -> StatusWeb:
        for t in self._threads:
            t.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in self._threads:
            t.join(15.0)

    def __enter__(self) -> StatusWeb:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.latest, self.error = self.poll(), None
            except Exception as e:  # a zenoh hiccup must not end the page: show it and try again
                self.error = f"the last poll failed: {type(e).__name__}: {e}"
            self.polls += 1
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def fragment(self) -> str:
        try:
            return render(self.latest, self.error)
        except Exception as e:  # a peer's odd answer must not take the page down: say what failed
            return f'<p class="error">cannot show this status: {html.escape(f"{type(e).__name__}: {e}")}</p>'

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        web = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/":
                    self._send(web._page.replace("__BODY__", web.fragment()), "text/html")
                elif path == "/fragment":
                    self._send(web.fragment(), "text/html")
                elif path == "/page.js":
                    self._send(web._script, "text/javascript")
                elif path == "/status.json":
                    body = dict(web.latest, error=web.error)
                    self._send(json.dumps(body, default=str), "application/json")
                else:
                    self._send("not found", "text/plain", 404)

            def _send(self, body: str, kind: str, code: int = 200) -> None:
                data = body.encode("utf-8")
                self.send_response(code)
                self.send_header("Content-Type", f"{kind}; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Security-Policy", CSP)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # one line per poll would drown the log
                pass

        return Handler


def serve_status_page(probe: StatusProbe, host: str, port: int, say: Callable[[str], None] = print) -> None:
    """Block until Ctrl-C (or SIGTERM), serving the page of the swarm that ``probe`` joins."""
    import signal

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with probe, StatusWeb(lambda: probe.poll(timeout=2.0), host, port) as web:
        say(f"status page of swarm {probe.swarm!r} on {web.url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            # one stop is enough: `timeout` and process-group kills deliver SIGTERM twice, and a
            # second one must not interrupt the shutdown below with a traceback
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)

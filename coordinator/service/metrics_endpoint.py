"""/metrics from a process of its own, so that nothing in the server can delay a scrape.

The server's process runs the gRPC handlers, the batcher and the jobs' threads under one GIL: a
busy or descheduled thread there holds every other one back, scrapes included (docs/performance.md,
"Serving beside training").
This process only answers HTTP. On each scrape it asks the server for a fresh text (the server
renders its registry: microseconds of work) and waits for it at most FRESH_WAIT seconds; past
that it answers with the last text it has, and `alexnet_metrics_snapshot_age_seconds` says how
old it is. So a scrape is answered within about FRESH_WAIT, whatever the server is doing.

Protocol, over the child's pipes: the child writes "port N\\n" (or "error TEXT\\n" and exits)
once it listens, then "?\\n" for each text it wants; the server answers each with an 8-byte
big-endian length and the text. The child exits when its stdin closes, so a server killed
with SIGKILL leaves no endpoint behind.

Run by path (`python metrics_endpoint.py HOST PORT`) with the standard library only: it starts
in tens of milliseconds and never imports torch or Ray.
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FRESH_WAIT = 0.5  # seconds a scrape waits for the server's fresh text before taking the last one
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format, as prometheus_client writes it
AGE_METRIC = (
    "# HELP alexnet_metrics_snapshot_age_seconds Age of the metrics in this scrape: above 0.5, the server was too busy "
    "to render them in time, and the last ones were served\n"
    "# TYPE alexnet_metrics_snapshot_age_seconds gauge\n"
    "alexnet_metrics_snapshot_age_seconds {age:.3f}\n"
)
HEADER = struct.Struct(">Q")


class Snapshots:
    """The server's latest text, and the asking for a newer one."""

    def __init__(self, ask):
        self._ask = ask
        self._changed = threading.Condition()
        self._text, self._taken = b"", 0.0  # the text, and when the server sent it

    def latest(self) -> tuple[bytes, float]:
        """A text no older than this call if the server sends one within FRESH_WAIT; else the last one."""
        asked = time.monotonic()
        self._ask()
        with self._changed:
            self._changed.wait_for(lambda: self._taken >= asked, timeout=FRESH_WAIT)
            return self._text, time.monotonic() - self._taken

    def receive(self, stream) -> None:
        """Take each text the server sends, until it closes the pipe."""
        while header := stream.read(HEADER.size):
            text = stream.read(HEADER.unpack(header)[0])
            with self._changed:
                self._text, self._taken = text, time.monotonic()
                self._changed.notify_all()


def handler_for(snapshots: Snapshots):
    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] not in ("/", "/metrics"):
                self.send_error(404, "only /metrics is served here")
                return
            text, age = snapshots.latest()
            body = text + AGE_METRIC.format(age=age).encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # one line per scrape would flood the server's log
            pass

    return MetricsHandler


def main(host: str, port: int) -> None:
    out = sys.stdout
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            out.write(line + "\n")
            out.flush()

    snapshots = Snapshots(lambda: say("?"))
    try:
        server = ThreadingHTTPServer((host, port), handler_for(snapshots))
    except OSError as exc:
        say(f"error {exc}")
        sys.exit(1)
    server.daemon_threads = True
    say(f"port {server.server_address[1]}")

    def until_the_server_goes():
        try:
            snapshots.receive(sys.stdin.buffer)
        finally:
            server.shutdown()

    threading.Thread(target=until_the_server_goes, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

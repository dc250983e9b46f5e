"""A scrape target of a test's own, for tests that feed the local Prometheus forged series."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gpuyard.logic.promql import quote_label_value


def sample_line(metric: str, labels: dict[str, str], value: float) -> str:
    """One sample in the text exposition format, its label values escaped."""
    rendered = ",".join(f"{name}={quote_label_value(text)}" for name, text in labels.items())
    selector = f"{{{rendered}}}" if rendered else ""
    return f"{metric}{selector} {value}"


class ScrapeTarget:
    """A tiny HTTP server that serves ``exposition``, registered with the local Prometheus
    through file-based service discovery: ``target_file`` names the job's discovery
    directory and file, ``labels`` become the target's labels. Used as a context manager:
    registered on entry, gone on exit."""

    def __init__(self, target_file: Path, labels: dict[str, str]) -> None:
        self.target_file = target_file
        self.labels = labels
        self.exposition = ""
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = target.exposition.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # Prometheus scrapes every second

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ScrapeTarget:
        self.thread.start()
        host, port = self.server.server_address[:2]
        groups = [{"targets": [f"{host!s}:{port}"], "labels": self.labels}]
        # Written whole and renamed into place: discovery never reads half a file.
        partial = self.target_file.with_suffix(".partial")
        partial.write_text(json.dumps(groups))
        os.replace(partial, self.target_file)
        return self

    def __exit__(self, *_: object) -> None:
        self.target_file.unlink(missing_ok=True)
        self.server.shutdown()
        self.server.server_close()

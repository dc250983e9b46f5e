"""JSON over plain HTTP, for the tools that drive the local cluster's side services (the
DCGM simulator, Prometheus, the operator's endpoints): tests and benchmarks alike."""

from __future__ import annotations

import json
import urllib.request
from typing import Any


def http_json(method: str, url: str, payload: Any = None) -> Any:
    """Send ``payload`` as JSON; the decoded answer, or None for an empty body."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        raw = response.read()
    return json.loads(raw) if raw else None

"""Prometheus queries over its HTTP API: how the autoscaler and the meter read GPU metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class PrometheusUnavailableError(RuntimeError):
    """Prometheus could not be asked, or answered with an HTTP error."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Prometheus:
    """A client for one Prometheus; queries are built and escaped by ``logic.promql``."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def query(self, promql: str) -> dict[str, Any]:
        """The decoded JSON body of an instant query (an error body is returned as is, for
        the parser to explain); raise ``PrometheusUnavailableError`` when none came."""
        return self._post("query", {"query": promql})

    def query_range(self, promql: str, start: int, end: int, step: int) -> dict[str, Any]:
        """A range query evaluated at ``start``, ``start + step``, ... up to ``end`` (epoch
        seconds), with the same error rules as :meth:`query`."""
        return self._post(
            "query_range", {"query": promql, "start": start, "end": end, "step": step}
        )

    def _post(self, endpoint: str, form: dict[str, Any]) -> dict[str, Any]:
        data = urllib.parse.urlencode(form).encode()
        request = urllib.request.Request(  # noqa: S310 - the URL is the operator's setting
            f"{self.base_url}/api/v1/{endpoint}",
            data=data,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                body: dict[str, Any] = json.load(response)
                return body
        except urllib.error.HTTPError as error:
            # Prometheus answers a bad query with 400 and a JSON error body.
            try:
                failed: dict[str, Any] = json.load(error)
            except (json.JSONDecodeError, OSError):
                raise PrometheusUnavailableError(
                    "PrometheusError", f"Prometheus answered HTTP {error.code}"
                ) from error
            return failed
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as error:
            raise PrometheusUnavailableError(
                "PrometheusUnreachable", f"cannot query Prometheus at {self.base_url}: {error}"
            ) from error

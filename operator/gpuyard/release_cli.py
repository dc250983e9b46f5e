"""`gpuyard release-finalizers`: let go of gpuyard's metering finalizer everywhere, so that
nothing gpuyard leaves behind holds a pod, a namespace or a GPUPool after an uninstall.

The chart runs it as a pre-delete hook; with plain manifests, run it before
`kubectl delete -f install.yaml`. In this order:

1. billing: while the operator still runs, wait (at most --billing-timeout) until it has
   billed and released the pods that have ended and the pools being deleted: their last
   seconds can still be billed, and only by the operator;
2. stop: scale the operator's Deployment (--stop-deployment) to 0 and wait until its pods
   are gone, since a running operator puts the finalizer back on every pod it meters;
3. release: remove the finalizer from every pod and GPUPool that carries it, keeping every
   other finalizer, and check that none is left.

Without --stop-deployment, steps 1 and 2 are skipped: stop the operator yourself first.
Usage of pods that keep running is billed up to the last usage window that closed before
the operator stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import kubernetes
import urllib3
from kubernetes.client import ApiException

from gpuyard.api.names import METERING_FINALIZER
from gpuyard.io.kube import make_api_client
from gpuyard.io.release import (
    PAGE_SIZE,
    PODS,
    POOLS,
    Kind,
    ReleaseClient,
    ReleaseError,
    api_error_text,
)
from gpuyard.logic.finalizer_release import (
    BillingWait,
    ReleaseTally,
    awaits_billing,
    belongs_to_deployment,
    holds_metering_finalizer,
    is_running,
    label_selector,
    listed,
    object_key,
    parse_deployment_ref,
    plural,
)

COMMAND = "gpuyard release-finalizers"
POLL_SECONDS = 1.0


class IncompleteReleaseError(Exception):
    """The command could not do its job; the message says what is left and what to do."""


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600 seconds: {text!r}")
    return value


def _page_size_arg(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 5000:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 5000: {text!r}")
    return int(text)


def _deployment_arg(text: str) -> tuple[str, str]:
    try:
        return parse_deployment_ref(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_release_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `release-finalizers` on the `add_subparsers()` object of `gpuyard`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "release-finalizers",
        help=f"remove {METERING_FINALIZER} from every pod and GPUPool (before uninstalling)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: in-cluster, else $KUBECONFIG or ~/.kube)"
    )
    parser.add_argument(
        "--stop-deployment",
        type=_deployment_arg,
        metavar="NAMESPACE/NAME",
        help="the operator's Deployment: wait for its billing, then scale it to 0 first",
    )
    parser.add_argument(
        "--billing-timeout",
        type=_seconds_arg,
        default=90.0,
        metavar="SECONDS",
        help=(
            "how long a running operator may take to bill what has ended (default 90: one "
            "60 s usage window, its 5 s settle time and a meter tick, with a margin; 0: no wait)"
        ),
    )
    parser.add_argument(
        "--stop-timeout",
        type=_seconds_arg,
        default=60.0,
        metavar="SECONDS",
        help="how long the operator's pods may take to go once scaled to 0 (default 60)",
    )
    parser.add_argument(
        "--page-size",
        type=_page_size_arg,
        default=PAGE_SIZE,
        metavar="N",
        help=f"objects per list request (default {PAGE_SIZE})",
    )
    parser.set_defaults(func=run_release)
    return parser


def run_release(args: argparse.Namespace) -> int:
    """Exit status 0 when no pod and no GPUPool holds the finalizer any more, else 1."""
    try:
        api = ReleaseClient(make_api_client(args.kubeconfig, pool_size=4), args.page_size)
        if args.stop_deployment:
            namespace, name = args.stop_deployment
            _bill_then_stop(api, namespace, name, args.billing_timeout, args.stop_timeout)
        else:
            print("stop: no --stop-deployment given: assuming no operator is running")
        tallies = [_release_all(api, PODS), _release_all(api, POOLS)]
        for tally in tallies:
            print(tally.describe())
        _check_none_left(api, tallies)
    except IncompleteReleaseError as error:
        print(f"{COMMAND}: error: {error}", file=sys.stderr)
        return 1
    except ApiException as error:
        print(f"{COMMAND}: error: the API server answered {api_error_text(error)}", file=sys.stderr)
        return 1
    except (kubernetes.config.ConfigException, urllib3.exceptions.HTTPError) as error:
        print(f"{COMMAND}: error: cannot reach the Kubernetes API: {error}", file=sys.stderr)
        return 1
    return 0


def _bill_then_stop(
    api: ReleaseClient, namespace: str, name: str, billing_timeout: float, stop_timeout: float
) -> None:
    deployment = api.deployment(namespace, name)
    if deployment is None:
        print(f"stop: no deployment {namespace}/{name}: no operator to stop")
        return
    if not is_running(deployment):
        print("billing: the operator has no ready pod; what has ended is released unbilled")
    elif billing_timeout > 0:
        print(_wait_for_billing(api, billing_timeout).describe())
    _stop(api, namespace, name, deployment, stop_timeout)


def _wait_for_billing(api: ReleaseClient, timeout: float) -> BillingWait:
    """Wait until every pod and pool that has ended and holds the finalizer is released
    (billed) by the running operator, or the deadline passes."""
    started = time.monotonic()
    pending: dict[str, tuple[Kind, dict[str, Any]]] = {}
    for kind in (PODS, POOLS):
        for obj in api.list_all(kind):
            if awaits_billing(obj):
                pending[f"{kind.name} {object_key(obj)}"] = (kind, obj["metadata"])
    awaited = tuple(sorted(pending))
    print(
        f"billing: waiting up to {timeout:.0f}s for the operator to bill "
        f"{plural(len(awaited), 'object')} that ended"
    )
    while pending and time.monotonic() - started < timeout:
        time.sleep(min(POLL_SECONDS, max(0.0, timeout - (time.monotonic() - started))))
        for key, (kind, metadata) in list(pending.items()):
            current = api.get(kind, metadata)
            if current is None or not holds_metering_finalizer(current):
                del pending[key]
    return BillingWait(
        awaited=awaited, unbilled=tuple(sorted(pending)), seconds=time.monotonic() - started
    )


def _stop(
    api: ReleaseClient, namespace: str, name: str, deployment: dict[str, Any], timeout: float
) -> None:
    """Scale the operator to 0 and wait until none of its pods is left."""
    try:
        selector = label_selector(deployment["spec"]["selector"])
    except ValueError as error:
        raise IncompleteReleaseError(f"deployment {namespace}/{name}: {error}") from None
    replicas = int(deployment["spec"].get("replicas", 1))
    if replicas:
        api.scale_to_zero(namespace, name)

    def operator_pods() -> list[str]:
        pods = api.pods(namespace, selector)
        return sorted(p["metadata"]["name"] for p in pods if belongs_to_deployment(p, name))

    started = time.monotonic()
    left = operator_pods()
    while left and time.monotonic() - started < timeout:
        time.sleep(POLL_SECONDS)
        left = operator_pods()
    if left:
        raise IncompleteReleaseError(
            f"deployment {namespace}/{name} still has {plural(len(left), 'pod')} "
            f"({listed(left)}) {timeout:.0f}s after scaling to 0; nothing was released, "
            "since a running operator puts the finalizer back. Run again once they are gone."
        )
    print(
        f"stop: deployment {namespace}/{name} scaled from {replicas} to 0; no pod of it is left "
        f"({time.monotonic() - started:.0f}s)"
    )


def _release_all(api: ReleaseClient, kind: Kind) -> ReleaseTally:
    tally = ReleaseTally(kind=kind.name)
    for obj in api.list_all(kind):
        tally.scanned += 1
        if not holds_metering_finalizer(obj):
            continue
        key = object_key(obj)
        try:
            if api.release(kind, obj):
                tally.released.append(key)
        except ReleaseError as error:
            tally.failed[key] = str(error)
    return tally


def _check_none_left(api: ReleaseClient, tallies: list[ReleaseTally]) -> None:
    """A second look: a finalizer still there means a release failed or an operator that
    still runs put it back."""
    left = [
        f"{kind.name} {object_key(obj)}"
        for kind in (PODS, POOLS)
        for obj in api.list_all(kind)
        if holds_metering_finalizer(obj)
    ]
    if left:
        failed = sum(len(tally.failed) for tally in tallies)
        why = (
            f"{plural(failed, 'release')} failed (see above)"
            if failed
            else "a gpuyard operator that still runs puts it back: stop it "
            "(--stop-deployment NAMESPACE/NAME) and run again"
        )
        raise IncompleteReleaseError(
            f"{METERING_FINALIZER} is still on {plural(len(left), 'object')} "
            f"({listed(left)}): {why}"
        )
    print(f"check: no pod and no GPUPool carries {METERING_FINALIZER} any more")

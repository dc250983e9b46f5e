"""``python -m localcluster up|down|status|env|build``: the local cluster from a shell.

``make cluster-up`` and ``make cluster-down`` wrap this.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from localcluster.cluster import ClusterState, LocalCluster, binaries_dir, default_state_dir
from localcluster.topology import DEFAULT_TOPOLOGY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localcluster", description=__doc__)
    parser.add_argument("--name", default="default", help="cluster name (default: %(default)s)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where the cluster keeps its files (default: ~/.cache/gpuyard/clusters/NAME)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="build what is missing and start the cluster")
    up.add_argument(
        "--topology",
        default=DEFAULT_TOPOLOGY,
        help="GPU pools as POOL=NODESxGPUS:TYPE[:dra],... (default: %(default)s)",
    )
    up.add_argument("--scrape-seconds", type=int, default=1, help="Prometheus scrape interval")
    up.add_argument(
        "--keda",
        action="store_true",
        help="also run KEDA's operator and metrics adapter (build them first: make keda)",
    )
    commands.add_parser("down", help="stop every process and remove the state directory")
    commands.add_parser("status", help="print the cluster's state as JSON")
    commands.add_parser("env", help="print shell `export` lines for KUBECONFIG and friends")
    commands.add_parser("build", help="only build the binaries; print their directory")
    args = parser.parse_args(argv)

    state_dir = args.state_dir or default_state_dir(args.name)
    cluster = LocalCluster(state_dir, name=args.name)
    if args.command == "build":
        print(binaries_dir(build=True))
    elif args.command == "up":
        state = cluster.up(
            topology=args.topology, scrape_seconds=args.scrape_seconds, with_keda=args.keda
        )
        print(f"# kubeconfig: {state.kubeconfig}", file=sys.stderr)
        _print_env(state)
    elif args.command == "down":
        cluster.down()
    else:
        try:
            state = ClusterState.load(state_dir)
        except FileNotFoundError:
            print(f"no cluster runs from {state_dir}", file=sys.stderr)
            return 1
        if args.command == "status":
            print(json.dumps(state.__dict__, indent=2))
        else:
            _print_env(state)
    return 0


def _print_env(state: ClusterState) -> None:
    for key, value in state.env().items():
        print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    sys.exit(main())

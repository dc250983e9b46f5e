"""The ``gpuyard`` command: ``run`` the operator, print or write the ``crds``, report ``usage``,
``release-finalizers`` before an uninstall, ``db migrate`` the PostgreSQL ledger."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gpuyard import __version__
from gpuyard.api.crd import crd_files, render_crds_yaml
from gpuyard.api.reference import render_reference
from gpuyard.config import Settings
from gpuyard.db_cli import add_db_parser
from gpuyard.handlers.runtime import run_operator
from gpuyard.release_cli import add_release_parser
from gpuyard.usage_cli import add_usage_parser


def _run(args: argparse.Namespace) -> int:
    overrides = {
        key: value
        for key, value in {
            "kubeconfig": args.kubeconfig,
            "cluster_id": args.cluster_id,
            "metrics_port": args.metrics_port,
            "health_port": args.health_port,
            "prometheus_url": args.prometheus_url,
            "autoscale_interval": args.autoscale_interval,
            "metrics_window_seconds": args.metrics_window,
            "gpu_exporter_matchers": args.gpu_exporter_matchers,
            "tenant_namespace_label": args.tenant_namespace_label,
            "workers": args.workers,
            "log_level": args.log_level,
            "log_format": args.log_format,
        }.items()
        if value is not None
    }
    settings = Settings(**overrides)
    run_operator(settings)
    return 0


def _write_crds(directory: Path) -> None:
    """One file per CRD in `directory` (the repository's crds/, the chart's files/crds/)."""
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, content in sorted(crd_files().items()):
        (directory / file_name).write_text(content, encoding="utf-8")


def _crds(args: argparse.Namespace) -> int:
    if args.reference:
        Path(args.reference).write_text(render_reference(), encoding="utf-8")
    if args.output_dir:
        _write_crds(Path(args.output_dir))
    elif not args.reference:
        sys.stdout.write(render_crds_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuyard",
        description="GPU scheduling, autoscaling and per-second usage billing for Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"gpuyard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the operator",
        description=(
            "Run the operator. Every option can also be set with a GPUYARD_* environment "
            "variable (GPUYARD_METRICS_PORT, GPUYARD_PROMETHEUS_URL, ...); flags win."
        ),
    )
    run.add_argument(
        "--kubeconfig", help="kubeconfig file (default: in-cluster, else ~/.kube/config)"
    )
    run.add_argument("--cluster-id", help="names this cluster in usage records")
    run.add_argument("--metrics-port", type=int, help="port of /metrics (default 8080; 0: none)")
    run.add_argument("--health-port", type=int, help="port of /healthz (default 8081)")
    run.add_argument("--prometheus-url", help="Prometheus to read GPU metrics from")
    run.add_argument("--autoscale-interval", type=float, help="seconds between ticks (default 5)")
    run.add_argument(
        "--metrics-window", type=int, help="seconds GPU metrics are averaged over (default 30)"
    )
    run.add_argument(
        "--gpu-exporter-matchers",
        metavar="MATCHERS",
        help='label matchers of the real DCGM exporter\'s series, such as job="dcgm-exporter" '
        "(default none: only plain namespace and pod labels are trusted)",
    )
    run.add_argument(
        "--tenant-namespace-label",
        metavar="LABEL",
        help="the scrape-target label that names a tenant metric's namespace (default "
        "namespace; the Prometheus Operator's enforcedNamespaceLabel where one is set)",
    )
    run.add_argument("--workers", type=int, help="concurrent reconciles (default 8)")
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--log-format", choices=["plain", "json"])
    run.set_defaults(func=_run)

    crds = commands.add_parser("crds", help="print the CRDs (or write them to a directory)")
    crds.add_argument("--output-dir", help="write one YAML file per CRD here instead")
    crds.add_argument("--reference", help="also write the Markdown API reference to this file")
    crds.set_defaults(func=_crds)
    add_usage_parser(commands)
    add_release_parser(commands)
    add_db_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())

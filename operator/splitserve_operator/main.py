"""`splitserve operator`: run the InferencePool controller (also `python -m splitserve_operator`).

Several replicas elect one active operator through kopf peering: each process takes a random
priority, the highest live one works, the others wait until its keep-alive expires.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import re
import sys
from collections.abc import Sequence
from typing import Any

import kopf

from splitserve_operator import naming
from splitserve_operator.handlers import Controller, register
from splitserve_operator.kube import Credentials
from splitserve_operator.settings import DEFAULT_WORKER_IMAGE, OperatorSettings

logger = logging.getLogger("splitserve.operator")


def default_credentials() -> kopf.ConnectionInfo | None:
    """In-cluster service account first, then the local kubeconfig (for development)."""
    settings = kopf.OperatorSettings()
    return kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)


def configure_kopf(registry: kopf.OperatorRegistry, controller: Controller, *, peering: bool) -> None:
    """kopf's own settings: annotations under our group, no kopf fields in the (structural) status."""

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=naming.GROUP, key="last-handled-configuration"
        )
        settings.persistence.finalizer = f"{naming.GROUP}/finalizer"
        # Namespaced mode needs no cluster-wide permission to watch CRDs.
        settings.scanning.disabled = not controller.settings.cluster_wide
        settings.peering.standalone = not peering
        settings.networking.request_timeout = 60

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo | None:
        return controller.credentials()

    @kopf.on.probe(id="pools", registry=registry)
    def pools_probe(**_: Any) -> int:
        return len(controller.last_full)

    @kopf.on.probe(id="reconciles", registry=registry)
    def reconciles_probe(**_: Any) -> int:
        return sum(controller.reconciled.values())


def build(
    settings: OperatorSettings, credentials: Credentials, *, peering: bool = False
) -> tuple[kopf.OperatorRegistry, Controller]:
    """A registry with every handler, bound to a fresh controller (tests build their own)."""
    registry = kopf.OperatorRegistry()
    controller = Controller(settings, credentials)
    configure_kopf(registry, controller, peering=peering)
    register(registry, controller)
    return registry, controller


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="splitserve operator", description="Run the InferencePool operator")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        dest="namespaces",
        help="namespace to watch (repeatable); default: all namespaces",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    parser.add_argument(
        "--prometheus-url",
        default=env("SPLITSERVE_PROMETHEUS_URL"),
        help="Prometheus the autoscaler queries for TTFT/ITL",
    )
    parser.add_argument(
        "--pod-monitor-label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="pod_monitor_labels",
        help="extra label of every PodMonitor (repeatable), e.g. release=kube-prometheus-stack",
    )
    parser.add_argument(
        "--pod-monitor-namespace",
        default=None,
        metavar="NAMESPACE",
        help="put every PodMonitor in this namespace (e.g. monitoring); default: each pool's own",
    )
    parser.add_argument(
        "--worker-image",
        default=env("SPLITSERVE_WORKER_IMAGE", DEFAULT_WORKER_IMAGE),
        help="worker image for pools that set no spec.image",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=8081,
        help="port of the operator's /metrics (the autoscaler's decisions); 0 to disable",
    )
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL; empty to disable"
    )
    parser.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="kopf peering object: several replicas elect one active operator",
    )
    parser.add_argument(
        "--priority", type=int, default=None, help="peering priority (default: random, so replicas never tie)"
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=2.0, help="how often each pool looks for changed children"
    )
    parser.add_argument("--resync-seconds", type=float, default=60.0, help="full reconcile of every pool")
    parser.add_argument(
        "--log-level",
        default=env("SPLITSERVE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument("--log-format", default="plain", choices=["plain", "json"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.poll_seconds <= 0 or args.resync_seconds <= 0:
        print("splitserve operator: --poll-seconds and --resync-seconds must be positive", file=sys.stderr)
        return 2
    if not 0 <= args.metrics_port <= 65535:
        print("splitserve operator: --metrics-port takes a port number, or 0 for none", file=sys.stderr)
        return 2
    labels = dict(label.partition("=")[::2] for label in args.pod_monitor_labels)
    if any(not key or not value for key, value in labels.items()):
        print("splitserve operator: --pod-monitor-label takes KEY=VALUE", file=sys.stderr)
        return 2
    monitors = args.pod_monitor_namespace
    if monitors is not None and not re.fullmatch(naming.NAMESPACE_PATTERN, monitors):
        print("splitserve operator: --pod-monitor-namespace takes a namespace name", file=sys.stderr)
        return 2
    level = getattr(logging, args.log_level.upper())
    kopf.configure(
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
        verbose=level <= logging.DEBUG,
    )
    logging.getLogger().setLevel(level)
    # kopf logs every timer tick at INFO; keep those for --log-level debug.
    logging.getLogger("kopf").setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
    settings = OperatorSettings(
        worker_image=args.worker_image,
        namespaces=tuple(args.namespaces),
        prometheus_url=args.prometheus_url,
        poll_seconds=args.poll_seconds,
        resync_seconds=args.resync_seconds,
        pod_monitor_labels=labels,
        pod_monitor_namespace=monitors,
    )
    registry, controller = build(settings, default_credentials, peering=args.peering is not None)
    if args.metrics_port:
        controller.metrics.serve(args.metrics_port)
    logger.info(
        "watching %s with worker image %s",
        ", ".join(settings.namespaces) or "all namespaces",
        settings.worker_image,
    )
    try:
        asyncio.run(
            kopf.operator(
                registry=registry,
                clusterwide=settings.cluster_wide,
                namespaces=list(settings.namespaces),
                liveness_endpoint=args.liveness or None,
                peering_name=args.peering,
                priority=args.priority if args.priority is not None else random.randint(1, 2**31),
                standalone=args.peering is None,
            )
        )
    except KeyboardInterrupt:
        return 130
    return 0

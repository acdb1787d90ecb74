"""`kubeinfer router`: run the model-aware OpenAI proxy (uvicorn over app.build_app)."""
from __future__ import annotations

import argparse
import logging
import sys

from kubeinfer.router.config import STRATEGIES, RouterConfig, RouterConfigError
from kubeinfer.router.endpoints import Backend, Endpoint, StaticSource


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    d = RouterConfig()
    p = subparsers.add_parser(
        "router", help="run the OpenAI-compatible router in front of the InferenceServices",
        description="One OpenAI endpoint for many models: routes /v1/chat/completions, "
                    "/v1/completions and /v1/embeddings by the request's model to the "
                    "InferenceService serving it (replicas from EndpointSlices), holds requests "
                    "while a model has no ready replica, and balances by least load or prefix hash.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                       help="route to InferenceServices of this namespace (repeatable); default: all")
    scope.add_argument("--static", action="append", metavar="MODEL=HOST:PORT[,HOST:PORT...]",
                       help="no cluster: serve MODEL from these replicas (repeatable)")
    p.add_argument("--kubeconfig", default=None, help="outside a cluster: this kubeconfig (default: ~/.kube/config)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--max-queue-wait", type=float, default=d.max_queue_wait, metavar="S",
                   help="seconds a request waits for a ready replica before a 503 (default %(default)s)")
    p.add_argument("--max-queue-size", type=int, default=d.max_queue_size, metavar="N",
                   help="requests held per model at most; more get a 503 at once (default %(default)s)")
    p.add_argument("--retry-after", type=int, default=d.retry_after, metavar="S",
                   help="Retry-After of the router's 503s (default %(default)s)")
    p.add_argument("--load-balancing", choices=STRATEGIES, default=d.default_strategy,
                   help="strategy of InferenceServices that name none (default %(default)s)")
    p.add_argument("--prefix-chars", type=int, default=d.prefix_chars, metavar="N",
                   help="prefix-hash: characters of the prompt / first user message hashed")
    p.add_argument("--load-factor", type=float, default=d.load_factor, metavar="F",
                   help="prefix-hash: no replica takes more than F x the mean load (default %(default)s)")
    p.add_argument("--max-failures", type=int, default=d.max_failures, metavar="N",
                   help="failures in a row after which a replica is skipped (default %(default)s)")
    p.add_argument("--eject-seconds", type=float, default=d.eject_seconds, metavar="S",
                   help="how long such a replica is skipped (default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, metavar="B")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    p.set_defaults(func=run_router)


def parse_static(specs: list[str], strategy: str) -> list[Backend]:
    out = []
    for spec in specs:
        model, sep, addrs = spec.partition("=")
        addresses = [a.strip().removeprefix("http://").rstrip("/") for a in addrs.split(",") if a.strip()]
        if not sep or not model or not addresses or any(":" not in a for a in addresses):
            raise RouterConfigError(f"--static {spec!r}: write MODEL=HOST:PORT[,HOST:PORT...], e.g. "
                                    "--static llama=10.0.0.5:8000,10.0.0.6:8000")
        out.append(Backend(model, "", model, strategy, tuple(Endpoint(a) for a in addresses)))
    return out


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from kubeinfer.router.app import build_app
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = RouterConfig(
            host=args.host, port=args.port, max_queue_wait=args.max_queue_wait,
            max_queue_size=args.max_queue_size, retry_after=args.retry_after,
            default_strategy=args.load_balancing, prefix_chars=args.prefix_chars,
            load_factor=args.load_factor, max_failures=args.max_failures,
            eject_seconds=args.eject_seconds, max_body_bytes=args.max_body_bytes)
        if args.static:
            source = StaticSource(parse_static(args.static, config.default_strategy))
        else:
            from kubeinfer.router.kube_source import EndpointSliceWatcher
            source = EndpointSliceWatcher(args.namespaces, default_strategy=config.default_strategy,
                                          kubeconfig=args.kubeconfig)
    except RouterConfigError as e:
        print(f"kubeinfer router: {e}", file=sys.stderr)
        return 2
    app = build_app(config, source)
    uvicorn.run(app, host=config.host, port=config.port, access_log=args.verbose,
                log_level="info", timeout_graceful_shutdown=30)
    return 0

"""`kubeinfer operator` (run the operator) and `kubeinfer render` (print its manifests offline)."""
from __future__ import annotations

import argparse
import dataclasses
import secrets
import sys

from kubeinfer.operator.settings import LWS_MODES, SCRAPE_MODES, OperatorSettings
from kubeinfer.operator.spec import API_VERSION, KIND, InvalidSpec, Problem


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "operator", help="run the Kubernetes operator that deploys InferenceServices",
        description="Watch InferenceServices and keep their Deployments, Services and "
                    "PodDisruptionBudgets as the spec says. Flags win over the KUBEINFER_* "
                    "environment variables (see kubeinfer/operator/settings.py).")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                       help="watch this namespace (repeatable); default: all namespaces")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch every namespace (the default without --namespace)")
    p.add_argument("--liveness-port", type=int, default=None, metavar="P",
                   help="serve the operator's own GET /healthz on this port (default 8080, 0: off)")
    p.add_argument("--resync-seconds", type=float, default=None, metavar="S",
                   help="reconcile every InferenceService this often: drift correction, and status "
                        "besides the refresh on pod events (default 10)")
    p.add_argument("--engine-image", default=None, help="engine image when spec.engine.image is empty")
    p.add_argument("--cluster-domain", default=None, help="e.g. cluster.local; default: none")
    p.add_argument("--leaderworkerset", choices=LWS_MODES, default=None,
                   help="use LeaderWorkerSet for pipeline > 1 (auto: when the API serves it)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="serve the operator's Prometheus /metrics on this port (default 8081, 0: off)")
    p.add_argument("--leader-election-namespace", default=None, metavar="NS",
                   help="elect a leader among operator replicas with the Lease kubeinfer-operator in "
                        "this namespace (default: none, run one replica)")
    p.add_argument("--scrape-via", choices=SCRAPE_MODES, default=None,
                   help="how spec.autoscaling reads engine metrics: pod-ip (default) or apiserver "
                        "(the API server's pod proxy; needs get on pods/proxy)")
    p.add_argument("--router-url", default=None, metavar="URL",
                   help="the kubeinfer router (http://NAME.NS.svc:8080): spec.autoscaling counts the "
                        "requests it holds, so minReplicas 0 scales up from zero (default: none)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every API call and handler")
    p.set_defaults(func=run_operator)

    r = subparsers.add_parser(
        "render", help="print the manifests the operator would apply for an InferenceService",
        description="Check an InferenceService against the CRD schema and the operator's rules, "
                    "then print the Deployment, Service and PodDisruptionBudget (or the multi-pod "
                    "objects for pipeline > 1) as multi-document YAML. No cluster needed.")
    r.add_argument("-f", "--filename", required=True, metavar="FILE",
                   help="YAML with one or more InferenceServices ('-' reads stdin)")
    r.add_argument("-n", "--namespace", default=None,
                   help="namespace when the resource has none (default: default)")
    r.add_argument("--engine-image", default=None, help="engine image when spec.engine.image is empty")
    r.add_argument("--leaderworkerset", action="store_true",
                   help="for pipeline > 1, render a LeaderWorkerSet instead of StatefulSets")
    r.set_defaults(func=run_render)


def _settings(args: argparse.Namespace) -> OperatorSettings:
    s = OperatorSettings.from_env()
    overrides = {}
    if getattr(args, "namespaces", None):
        overrides["namespaces"] = tuple(args.namespaces)
    if getattr(args, "all_namespaces", False):
        overrides["namespaces"] = ()
    for key in ("liveness_port", "resync_seconds", "engine_image", "cluster_domain", "metrics_port",
                "leader_election_namespace", "scrape_via", "router_url"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if overrides.get("router_url"):
        overrides["router_url"] = overrides["router_url"].strip().rstrip("/")
    lws = getattr(args, "leaderworkerset", None)
    if isinstance(lws, str):
        overrides["leaderworkerset"] = lws
    return dataclasses.replace(s, **overrides)


def run_operator(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import kopf  # lazily: `kubeinfer serve` never needs it

    from kubeinfer.operator import handlers

    # log_prefix: kopf's lines about an object start with [namespace/name]
    kopf.configure(verbose=args.verbose, log_prefix=True)
    scope = "all namespaces" if settings.all_namespaces else ", ".join(settings.namespaces)
    print(f"kubeinfer operator: watching {scope}; resync every {settings.resync_seconds:g} s; "
          f"default engine image {settings.engine_image}", file=sys.stderr, flush=True)
    return handlers.run(settings)


def _read(filename: str) -> str:
    if filename == "-":
        return sys.stdin.read()
    with open(filename, encoding="utf-8") as f:
        return f.read()


def check(doc: object, schema: dict | None) -> tuple[dict, list[Problem]]:
    """The InferenceService with schema defaults, and every problem (schema first, then spec.py)."""
    from kubeinfer.operator import schema as crd_schema
    from kubeinfer.operator.spec import parse_spec

    if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("apiVersion") != API_VERSION:
        kind = doc.get("kind") if isinstance(doc, dict) else doc
        return {}, [Problem("kind", kind, f"expected kind {KIND} with apiVersion {API_VERSION}")]
    problems: list[Problem] = []
    if schema is not None:
        doc, problems = crd_schema.validate(doc, schema)
    meta = doc.get("metadata") or {}
    try:
        parse_spec(meta.get("name", ""), meta.get("namespace", "default"), doc.get("spec") or {},
                   default_image="image")
    except InvalidSpec as e:
        seen = {p.field for p in problems}
        problems += [p for p in e.problems if p.field not in seen]
    return doc, problems


def run_render(args: argparse.Namespace) -> int:
    import yaml

    from kubeinfer.operator import multinode
    from kubeinfer.operator import schema as crd_schema
    from kubeinfer.operator.render import common_labels, render
    from kubeinfer.operator.spec import parse_spec

    try:
        text = _read(args.filename)
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except OSError as e:
        print(f"error: cannot read {args.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except yaml.YAMLError as e:
        print(f"error: {args.filename} is not valid YAML: {e}", file=sys.stderr)
        return 2
    if not docs:
        print(f"error: {args.filename} holds no InferenceService", file=sys.stderr)
        return 2
    try:
        schema = crd_schema.load_schema()
    except (OSError, ValueError) as e:
        schema = None
        print(f"warning: {e}; checking the operator's rules only", file=sys.stderr)
    try:
        settings = _settings(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out, failed = [], False
    for i, raw in enumerate(docs):
        if isinstance(raw, dict) and raw.get("kind") != KIND and raw.get("apiVersion") != API_VERSION:
            print(f"note: skipping {raw.get('kind')} {(raw.get('metadata') or {}).get('name', '')}: "
                  "not an InferenceService", file=sys.stderr)
            continue
        doc, problems = check(raw, schema)
        meta = (raw.get("metadata") if isinstance(raw, dict) else None) or {}
        name = meta.get("name") or f"(document {i + 1})"
        if problems:
            failed = True
            print(f"error: InferenceService {name} in {args.filename} is invalid "
                  f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            continue
        namespace = meta.get("namespace") or args.namespace or "default"
        spec = parse_spec(meta["name"], namespace, doc.get("spec") or {},
                          default_image=settings.engine_image)
        objs = render(spec, settings, use_lws=args.leaderworkerset)
        if spec.pipeline > 1:   # the operator makes it once; here a fresh value, so the output applies
            objs.insert(0, multinode.node_secret(spec, common_labels(spec.name), secrets.token_urlsafe(32)))
        header = (f"# kubeinfer render: what the operator applies for InferenceService {namespace}/"
                  f"{meta['name']}\n# (plus an ownerReference to it, once it exists in the cluster)\n")
        out.append(header + yaml.safe_dump_all(objs, sort_keys=False, default_flow_style=False))
    if not out and not failed:
        print(f"error: {args.filename} holds no InferenceService", file=sys.stderr)
        return 2
    if failed:
        return 1
    sys.stdout.write("---\n".join(out))
    return 0

"""`kubeinfer serve [MODEL] [flags]`: the OpenAI-compatible server under uvicorn.

The server listens at once and loads the model in a thread: /health answers 503 until the engine
runs, so a kubelet startup probe can tell "loading" from "dead". A model that fails to load ends the
process with the reason on stderr and exit status 1. SIGTERM turns /health to 503 at once, stops
accepting connections, lets running requests finish for up to --timeout-graceful-shutdown seconds,
answers those still open with an error (`drain.py`), then stops the engine; the exit status is 0
after a clean drain and 1 when requests had to be cut.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from kubeinfer.engine.args import EngineArgs, int_arg
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.models.registry import architectures_help
from kubeinfer.engine.server.termination_log import write_termination_message

API_KEY_ENV = "KUBEINFER_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


_port = int_arg(0, 65535, "a port number")
_seconds = int_arg(0, None, "a number of seconds")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/embeddings, /v1/models, /health, /metrics).",
        # the full usage line lists every flag; an error message should stay readable
        usage="kubeinfer serve [MODEL] [options]  (kubeinfer serve --help lists them)",
        epilog=architectures_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    g.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000)")
    g.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on API routes (default: ${API_KEY_ENV}"
                        "); /health, /metrics and /version stay open")
    g.add_argument("--root-path", default="", help="path prefix when behind a proxy that adds one")
    g.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="enable CORS for these origins ('*' for any)")
    g.add_argument("--uvicorn-log-level", default="info", choices=LOG_LEVELS)
    g.add_argument("--disable-uvicorn-access-log", action="store_true", default=False)
    g.add_argument("--disable-log-requests", action="store_true", default=False,
                   help="do not log a line per request")
    g.add_argument("--timeout-graceful-shutdown", type=_seconds, default=30,
                   help="on SIGTERM, seconds to let running requests finish; those still open "
                        "then get an error (a stream an error event and [DONE], a request a 503 "
                        "with Retry-After) and the process exits 1 (default: 30)")
    g.add_argument("--headless", action="store_true", default=False,
                   help="a worker node of a multi-node engine (--node-rank > 0): no API server, "
                        "only this node's ranks, which node 0 drives")
    g.add_argument("--trust-request-chat-template", action="store_true", default=False,
                   help="render a request's own `chat_template` (in jinja2's sandbox, which "
                        "bounds neither time nor memory); without it such a request is a 400")
    g.add_argument("--enable-auto-tool-choice", action="store_true", default=False,
                   help="with tools and tool_choice \"auto\" (the default), read tool calls out of "
                        "the model's output with --tool-call-parser")
    g.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="the model family's tool-call format: hermes, llama3_json, mistral, "
                        "pythonic (needed by --enable-auto-tool-choice)")
    p.set_defaults(func=run_serve)
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    write_termination_message(message)
    return 1


def _check_tool_flags(args: argparse.Namespace) -> None:
    if args.tool_call_parser is not None:
        from kubeinfer.engine.tool_parsers.registry import get_tool_parser

        get_tool_parser(args.tool_call_parser)  # ConfigError listing the names
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser NAME (hermes, "
                          "llama3_json, mistral or pythonic: the format of the model's tool calls)")


def _run_headless(config) -> int:
    """A worker node: only its ranks, driven by node 0, until node 0 stops them."""
    logging.basicConfig(level="INFO", format="%(levelname)s %(asctime)s %(name)s: %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    from kubeinfer.engine.loader.resolve import resolve_model
    from kubeinfer.engine.node_relay import run_headless

    device_type = config.device.resolve()
    try:
        return run_headless(config.parallel,
                            lambda cfg: resolve_model(cfg.model, device_type),
                            device_type)
    except ConfigError as e:
        return _fail(str(e))


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = EngineArgs.from_cli_args(args).create_engine_config()
    except ConfigError as e:
        return _fail(str(e))
    node_rank = config.parallel.node_rank
    if args.headless != (node_rank > 0):
        return _fail(f"--node-rank {node_rank} with{'' if args.headless else 'out'} --headless: "
                     "node 0 runs the API server and every other node runs --headless; fix the "
                     "flags")
    if args.headless:
        return _run_headless(config)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        _check_tool_flags(args)
    except ConfigError as e:
        return _fail(str(e))

    import uvicorn

    from kubeinfer.engine.server.api import build_app
    from kubeinfer.engine.server.drain import CUT_GRACE_S, DrainingServer
    from kubeinfer.engine.server.model_lifecycle import ModelLifecycle

    level = "INFO" if args.uvicorn_log_level == "trace" else args.uvicorn_log_level.upper()
    logging.basicConfig(level=level, format="%(levelname)s %(asctime)s %(name)s: %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    lifecycle = ModelLifecycle(config, api_key=api_key, log_requests=not args.disable_log_requests,
                               drain_timeout_s=args.timeout_graceful_shutdown,
                               trust_request_chat_template=args.trust_request_chat_template,
                               tool_call_parser=args.tool_call_parser,
                               enable_auto_tool_choice=args.enable_auto_tool_choice)
    app = build_app(lifecycle, allowed_origins=args.allowed_origins)
    # uvicorn's own deadline comes after the drain's, which answers what is still open
    server = DrainingServer(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log, root_path=args.root_path,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown + CUT_GRACE_S, lifespan="on"),
        lifecycle.drain)

    def on_load_failure(message: str) -> None:
        _fail(message)
        server.should_exit = True

    def on_signal(signum, frame) -> None:
        # uvicorn handles SIGTERM/SIGINT while it serves (stop accepting, drain, stop the engine)
        # and re-raises the signal when done; landing here then makes a drained server exit 0
        # rather than die of the signal (or print a KeyboardInterrupt traceback).
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    lifecycle.on_load_failure = on_load_failure
    server.run()
    if lifecycle.load_error is not None or lifecycle.drain.cut_count:
        return 1
    return 0 if server.started else 1

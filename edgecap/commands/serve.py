"""``edgecap serve [--host 127.0.0.1] [--port 8765]``: a local HTTP caption service
(``edgecap.serve``): ``POST /caption`` with an image's bytes -> its caption as JSON;
``GET /health``. Needs the ``serve`` extra (aiohttp); see docs/service.md."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import warnings

from edgecap.commands._options import add_model_arguments, load_captioner, renamed

# ServiceOptions' fields as the flags that set them, for its messages
SERVICE_FLAGS = {
    "max_body_bytes": "--max-body-mb",
    "max_pending": "--max-pending",
    "max_batch": "--max-batch",
    "max_wait_ms": "--max-wait-ms",
    "read_timeout_s": "--read-timeout",
}

EPILOG = """examples:
  edgecap serve --port 8765
  curl -s --data-binary @photo.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8765/caption

answers (JSON): 200 the caption; 400 not an image; 408 the body did not arrive in time;
413 the body is too large; 415 not an image Content-Type; 500 the model failed on this
image (logged; the others of its batch are captioned); 503 busy (retry later).

exit status: 0 stopped by SIGTERM; 2 usage, model or address error (the port in use);
130 stopped by Ctrl-C"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgecap.serve import DEFAULT_HOST, DEFAULT_PORT, MIB, ServiceOptions

    defaults = ServiceOptions()
    p.epilog = EPILOG  # edgecap.cli's formatter keeps its layout
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on: keep the loopback default unless the network "
        "is trusted (the service has no authentication)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: any free port")
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=defaults.max_body_bytes / MIB,
        metavar="MB",
        help="largest image accepted (413 above)",
    )
    p.add_argument(
        "--max-pending",
        type=int,
        default=defaults.max_pending,
        metavar="N",
        help="requests read, queued or captioned at once (503 above)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        metavar="N",
        help="most images captioned together, at most --batch-size (default: "
        "--batch-size; 1: no batching); above it is refused",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=defaults.max_wait_ms,
        metavar="MS",
        help="how long a batch waits for more requests after its first, while more are "
        "arriving (their bodies being read; a lone client's request does not wait)",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=defaults.read_timeout_s,
        metavar="S",
        help="seconds a client has to send its body (408 after)",
    )
    add_model_arguments(p, overlaps=False)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    # The command owns its process, as caption's: Pillow's warning on a large image would only
    # repeat, in the service's log, the InputError its client gets
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    from edgecap.serve import MIB, CaptionService, ServiceOptions, announce, is_loopback, serve, warm_up

    try:
        if not (math.isfinite(args.max_body_mb) and args.max_body_mb > 0):
            raise ValueError(f"--max-body-mb must be a positive number of MB, got {args.max_body_mb:g}")
        options = ServiceOptions(
            max_body_bytes=math.ceil(args.max_body_mb * MIB),
            max_pending=args.max_pending,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            read_timeout_s=args.read_timeout,
        )
        options.validate()
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
        if not args.host.strip():  # --host "$HOST" unset: every interface, said as "http://:PORT"
            raise ValueError(
                "--host is empty (an unset variable?); give an address: 127.0.0.1 (the default), "
                "or 0.0.0.0 for every interface"
            )
        captioner = load_captioner(args)
        service = CaptionService(captioner, options)
        warm_up(captioner, service.max_batch)
    except ValueError as exc:
        print(f"edgecap serve: error: {renamed(str(exc), SERVICE_FLAGS)}", file=sys.stderr)
        return 2

    def ready(port: int) -> None:  # listening: warn of an open address now, not before a failed bind
        if not is_loopback(args.host):
            print(
                f"edgecap serve: warning: listening on {args.host}: anyone who can reach it can "
                "use the service (there is no authentication)",
                file=sys.stderr,
            )
        announce(args.host, port)

    try:
        with captioner:  # closed once the service has stopped
            stopped_by = serve(service, args.host, args.port, ready=ready)
    except OSError as exc:  # the port in use, an address this machine does not have
        print(
            f"edgecap serve: error: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})",
            file=sys.stderr,
        )
        return 2
    if stopped_by == getattr(signal, "SIGHUP", None):  # the command ends by it (docs/cli.md)
        from edgecap.cli import terminated

        terminated(stopped_by)
    return 130 if stopped_by == signal.SIGINT else 0

"""A local caption service: other processes (C++, Rust, a shell) POST an image and get its caption.

    edgecap serve                                   # http://127.0.0.1:8765, the shipped model
    curl -s --data-binary @photo.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8765/caption
    {"caption": "a dog runs through the grass", "score": -0.61, "objects": [["golden retriever",
     0.81], ...], "confidence": 0.55, "recognisable": true, "crop": null, "timings": {...},
     "batch": 1}

Endpoints: ``POST /caption`` (the body: the image file's bytes, any format ``edgecap.images``
accepts; ``Content-Type: image/...`` or ``application/octet-stream``) and ``GET /health``. The
caption fields are those of ``edgecap caption --json`` (``edgecap.commands.output``) and equal to
``Captioner.caption`` on the same bytes; ``timings`` (ms) add ``queue_ms`` (waiting for the model)
and ``total_ms`` (from the start of reading the body, a slow upload included, to the answer),
``batch`` the number of images captioned together with this one. A request with an
``Edgecap-Previous-Caption`` header (the caption the client's camera was given last) gets that
caption kept where it still fits the image about as well (``Captioner.caption(previous=...)``),
and a ``held`` field saying whether it was.

Built on aiohttp: asyncio, so a slow client costs one coroutine, not a thread, and batching is a
queue read with a bounded wait; its request parser is the C llhttp one, and its body limit answers
413 by itself. Requests that arrive together are captioned together (``Batcher``): the worker
takes what is queued, waits at most ``max_wait_ms`` for more while more are arriving (their bodies
being read: a lone client does not wait), up to ``max_batch`` images, and runs
them as one ``Captioner.caption_batch`` in its own thread while the event loop keeps reading
requests. Limits, each a clear JSON error (``{"error": "..."}``) after which the service keeps
serving:

- 413: a body over ``max_body_bytes`` (refused from its Content-Length before it is read, before
  it is sent with ``Expect: 100-continue``, or while a chunked body is read);
- 503 (with ``Retry-After``): ``max_pending`` requests are already being read, queued or
  captioned; memory stays below ``max_pending x max_body_bytes`` for bodies; or the service is
  stopping while the body is still arriving;
- 408: a body not received within ``read_timeout_s`` (a client that stalls);
- 415: a Content-Type that is not an image (a form, JSON, text); 400: a body that is not an
  image edgecap can decode, or an empty one, or an ``Edgecap-Previous-Caption`` that is not a
  line of printable ASCII of at most ``MAX_PREVIOUS_CHARS`` characters, or is given more than once;
- 500: the model raised on this image (out of memory, ...): one line and one log line; a batch
  that fails is retried one image at a time, so the other requests of it are answered.

The service listens on loopback (127.0.0.1) unless told otherwise: it has no authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import math
import signal
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from edgecap.errors import InputError, MissingPackageError, counted, reason
from edgecap.extras import install_hint

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MIB = 1024 * 1024
# the request header that carries the caption said last for the client's camera (its text)
PREVIOUS_HEADER = "Edgecap-Previous-Caption"
MAX_PREVIOUS_CHARS = 1000


@dataclass(frozen=True)
class ServiceOptions:
    """The service's limits. ``max_batch`` None: the captioner's ``batch_size``; 1: no batching
    (one image per model run). ``max_wait_ms``: how long a batch waits for more requests after
    its first one, while more are arriving (their bodies being read)."""

    max_body_bytes: int = 16 * MIB
    max_pending: int = 64
    max_batch: int | None = None
    max_wait_ms: float = 5.0
    read_timeout_s: float = 10.0

    def validate(self) -> None:
        for name in ("max_body_bytes", "max_pending"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_batch is not None and (
            isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1
        ):
            raise ValueError(f"max_batch must be None or a positive integer, got {self.max_batch!r}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise ValueError(f"max_wait_ms must be between 0 and 1000, got {self.max_wait_ms!r}")
        if not 0 < self.read_timeout_s < math.inf:  # inf: a stalled upload holds its slot for ever
            raise ValueError(
                f"read_timeout_s must be a positive number of seconds, got {self.read_timeout_s!r}"
            )


def _aiohttp():
    try:
        from aiohttp import web
    except ImportError as exc:
        raise MissingPackageError(f"edgecap serve needs aiohttp: {install_hint('serve')} ({exc})") from exc
    return web


class ServiceStopping(Exception):
    """Set on the body of a request still arriving when the service stops: aiohttp reads nothing
    more from any connection once a stop begins, so the rest of it would never come."""


class ModelFailure(Exception):
    """The model raised on an image (out of memory, a runtime failure): its request answers 500
    with this one-line message; the service keeps serving."""


def one_line(exc: BaseException) -> str:
    """The exception's type and its one-line reason (``edgecap.errors.reason``)."""
    return f"{type(exc).__name__}: {reason(exc)}" if str(exc).strip() else type(exc).__name__


def log(message: str) -> None:
    _logged(f"edgecap serve: error: {message}")


def note(message: str) -> None:
    """A log line that is no error of the service (a client that went away)."""
    _logged(f"edgecap serve: {message}")


def _logged(line: str) -> None:
    """``line`` on stderr, or nowhere where it cannot be written (whoever read the log, a
    ``| tee`` or a supervisor, went away: a broken pipe): the service goes on serving. Raised
    from inside the batcher's error handling, that had ended the batcher, and every request
    after waited for ever while /health said ok."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # a broken pipe, a closed stream
        pass


class OneLineLog(logging.LoggerAdapter):
    """aiohttp's server log (``RequestHandler.logger``) as the service's own log lines: a request
    aiohttp refuses before the service sees it (not HTTP, a bad Content-Length, a header over
    8 KB) is one line naming the client and the problem (cut at 300 characters: the parser
    quotes the request's bytes), not a traceback for each such request."""

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        text = msg % args if args else str(msg)
        if exc is not None:
            why = one_line(exc)
            text += f" ({why[:300]}{'...' if len(why) > 300 else ''})"
        log(text)


class Batcher:
    """Captions queued images in batches on one worker thread.

    ``await submit(data, previous)`` -> (``Caption`` or ``InputError``, the batch's size, ms
    queued); ``previous``: the caption to hold (``Captioner.caption``'s), or None. Run
    ``await run()`` as a task: it takes the first queued image, then whatever else is queued,
    waiting at most ``max_wait_s`` (from the first) for more, up to ``max_batch`` images.
    ``arriving``: how many requests are on their way to the queue now (their bodies being
    read); given, a batch waits for more only while one is, so that a lone client's request
    runs at once rather than after a wait for requests that are not coming (None: it always
    waits). ``arrivals_changed()``: a request stopped arriving (its body read, or its read
    failed: a 408, 413, a client gone); a batch waiting asks ``arriving`` again, so that one
    waiting for a request that will never be queued runs then, not at the end of its wait."""

    def __init__(
        self,
        captioner,
        max_batch: int,
        max_wait_s: float,
        arriving: Callable[[], int] | None = None,
    ):
        self.captioner = captioner
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.arriving = arriving
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="edgecap-serve-model")
        self._recheck = asyncio.Event()  # set by arrivals_changed: a waiting batch asks again

    def arrivals_changed(self) -> None:
        """A request stopped arriving (``arriving`` counts one fewer): a batch waiting for more
        asks ``arriving`` again."""
        self._recheck.set()

    async def submit(self, data: bytes, previous: str | None = None):
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((data, future, time.perf_counter(), previous))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # a request whose client went away while it was queued (its handler cancelled: its
            # future is too) is dropped unread: no model time, no place in a batch
            first = await self.queue.get()
            if first[1].done():
                continue
            batch = [first]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    item = self.queue.get_nowait()
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or (self.arriving is not None and not self.arriving()):
                        break
                    item = await self._next(remaining)
                    if item is None:  # the wait is over, or arrivals changed: asked again above
                        continue
                if not item[1].done():
                    batch.append(item)
            started = time.perf_counter()
            try:
                results = await self._caption([item[0] for item in batch], [item[3] for item in batch])
            except Exception as exc:  # noqa: BLE001 (the model failed on one of them, or all)
                log(
                    f"the model failed on a batch of {len(batch)} ({one_line(exc)})"
                    + ("; captioning its images one at a time" if len(batch) > 1 else "")
                )
                await self._one_at_a_time(batch, started)
                continue
            for (_, future, queued, _), result in zip(batch, results):
                if not future.done():  # a request whose client went away is dropped here
                    future.set_result((result, len(batch), (started - queued) * 1e3))

    async def _next(self, timeout: float):
        """The next queued request, or None after ``timeout`` seconds or once
        ``arrivals_changed`` is called, whichever comes first."""
        self._recheck.clear()
        getter = asyncio.ensure_future(self.queue.get())
        changed = asyncio.ensure_future(self._recheck.wait())
        try:
            await asyncio.wait((getter, changed), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            getter.cancel()  # a get cancelled before it took its item leaves it queued
        return getter.result() if getter.done() and not getter.cancelled() else None

    async def _caption(self, images: list[bytes], previous: list[str | None]) -> list:
        # previous only where a request gave one (a captioner stand-in may not take it)
        held = {"previous": previous} if any(p is not None for p in previous) else {}
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial(self.captioner.caption_batch, images, on_error="return", **held)
        )

    async def _one_at_a_time(self, batch: list, started: float) -> None:
        """After a batch failed: each image alone, so that only the request whose image the
        model fails on hears of it (its result: the ``ModelFailure``)."""
        for data, future, queued, previous in batch:
            if future.done():
                continue
            try:
                result = (await self._caption([data], [previous]))[0]
            except Exception as exc:  # noqa: BLE001 (this image's request answers 500)
                if len(batch) > 1:
                    log(f"the model failed on one image of {len(data):,} bytes ({one_line(exc)})")
                result = ModelFailure(one_line(exc))
            if not future.done():
                future.set_result((result, 1, (started - queued) * 1e3))

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


# the paths the service answers and their methods (aiohttp answers HEAD as GET)
ROUTES = {"/caption": ("POST",), "/health": ("GET", "HEAD")}


class CaptionService:
    """The aiohttp application around a ``Captioner`` (``app``); ``pending``: requests being read,
    queued or captioned now."""

    def __init__(self, captioner, options: ServiceOptions | None = None):
        web = _aiohttp()
        self.options = options or ServiceOptions()
        self.options.validate()
        self.captioner = captioner
        batch_size = captioner.options.batch_size
        if self.options.max_batch is not None and self.options.max_batch > batch_size:
            raise ValueError(
                f"max_batch {self.options.max_batch} is over the captioner's batch "
                f"size {batch_size}: the model runs at most {counted(batch_size, 'image')} "
                "at once (raise --batch-size with it)"
            )
        self.max_batch = self.options.max_batch or batch_size
        self.pending = 0
        self.batcher: Batcher | None = None
        self._worker: asyncio.Task | None = None
        # connection -> the body of its last request, answered before it was read to its end
        # (a 413): aiohttp then reads and drops the rest for up to 10 s ("lingering"), and a
        # graceful stop would wait for that; a stop closes these connections at once instead
        self._unread: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._reading: set = set()  # the bodies being read now (request.content)
        self.app = web.Application(
            # + 1: aiohttp before 3.14 refuses a body of client_max_size bytes too; a body of
            # max_body_bytes + 1 that aiohttp 3.14 lets through is refused after the read below
            client_max_size=self.options.max_body_bytes + 1,
            middlewares=[_noting_unread_bodies(web, self._unread), _json_errors(web)],
        )
        self.app.router.add_post("/caption", self.caption, expect_handler=self._expect)
        self.app.router.add_get("/health", self.health, expect_handler=self._expect_elsewhere)
        # every other path and method: a JSON 404 or 405 (by the middleware), and, for a request
        # with an Expect header, before its body is sent (aiohttp's own handler of the header
        # answered a typo'd path "100 Continue", took the whole body, then said 404; and it said
        # 417 in plain text, before any middleware, for another expectation)
        self.app.router.add_route("*", "/{path:.*}", self._no_route, expect_handler=self._expect_elsewhere)
        self.app.on_startup.append(self._start)
        self.app.on_shutdown.append(self._close_unread)
        self.app.on_shutdown.append(self._end_reads)
        self.app.on_cleanup.append(self._stop)

    async def _start(self, app) -> None:
        self.batcher = Batcher(
            self.captioner,
            self.max_batch,
            self.options.max_wait_ms / 1e3,
            arriving=lambda: len(self._reading),
        )
        self._worker = asyncio.get_running_loop().create_task(self.batcher.run())

    async def _close_unread(self, app) -> None:
        """At a stop (after the listening sockets are closed, before waiting for the requests in
        flight): close the connections that are only reading an answered request's unwanted body,
        so that a client holding an over-limit upload open does not hold up the stop. A
        connection whose body has since ended has moved on to its next request and is left to
        finish it (ended: all of it received, ``is_eof``, though aiohttp may have left it unread
        in its buffer, ``at_eof`` false, when it came in one packet with the headers)."""
        for transport, body in list(self._unread.items()):
            if not body.is_eof() and not transport.is_closing():
                transport.close()

    async def _end_reads(self, app) -> None:
        """At a stop: a body still arriving is refused now (503, send it again), not answered
        408 after ``read_timeout_s`` (which held the stop up that long): once a stop begins,
        aiohttp drops what the connections send (``RequestHandler.data_received`` after
        ``close()``), so the rest of the body would never be read."""
        for body in list(self._reading):
            if not body.is_eof():
                body.set_exception(ServiceStopping())

    async def _stop(self, app) -> None:
        if self._worker is not None:
            self._worker.cancel()
        if self.batcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)
        _forget_built_handlers()

    async def health(self, request):
        from edgecap.commands.output import names_repaired

        web = _aiohttp()
        # the model folder named as caption names paths: U+FFFD and model_base64 for a name that
        # is not UTF-8 (it had been a lone surrogate escape, which strict JSON readers refuse)
        return web.json_response(
            names_repaired(
                {
                    "status": "ok",
                    "model": str(self.captioner.manifest.directory),
                    "backend": self.captioner.backend.describe(),
                    "pending": self.pending,
                    "max_pending": self.options.max_pending,
                    "max_batch": self.max_batch,
                    "max_wait_ms": self.options.max_wait_ms,
                    "max_body_bytes": self.options.max_body_bytes,
                }
            )
        )

    def _refused(self, web, request):
        """The answer to a request refused from its line and headers alone (a query, not an
        image, over the body limit, busy), or None."""
        options = self.options
        if request.query_string:  # ?beam_size=1 would be taken for a setting it is not
            return _error(
                web,
                400,
                f"POST /caption takes no query parameters, got ?{request.query_string[:200]}: the "
                "caption options are the service's own (edgecap serve --beam-size ...)",
            )
        kind = request.content_type  # aiohttp: application/octet-stream when none is given
        if not (kind == "application/octet-stream" or kind.startswith("image/")):
            return _error(
                web,
                415,
                f"Content-Type {kind} is not an image: send the image file's "
                "bytes as the body with Content-Type image/jpeg, image/png, "
                "... or application/octet-stream",
            )
        given = request.headers.getall(PREVIOUS_HEADER, [])
        if len(given) > 1:  # which one is the caption said last? (a proxy may join them with ", ")
            return _error(
                web,
                400,
                f"{PREVIOUS_HEADER} given {len(given)} times: give it once, the caption said last",
            )
        previous = given[0] if given else None
        if previous is not None and not (
            len(previous) <= MAX_PREVIOUS_CHARS and previous.isascii() and previous.isprintable()
        ):
            return _error(
                web,
                400,
                f"{PREVIOUS_HEADER} must be the caption said last, a line of printable ASCII of at most "
                f"{MAX_PREVIOUS_CHARS:,} characters (got {len(previous):,} characters)",
            )
        if request.content_length is not None and request.content_length > options.max_body_bytes:
            return _too_large(web, request.content_length, options.max_body_bytes)
        if self.pending >= options.max_pending:
            return _error(
                web,
                503,
                f"busy: {counted(self.pending, 'request is', 'requests are')} already waiting "
                f"(max_pending {options.max_pending}); retry later",
                headers={"Retry-After": "1"},
            )
        return None

    async def _expect(self, request):
        """``Expect: 100-continue`` (curl sends it with a body over 1 MB): a request refused from
        its headers is answered now, before the client sends its body (aiohttp's own handler
        answered "100 Continue" first, and a client on a slow link uploaded all 20 MB of an
        over-limit body before its 413); else the interim "100 Continue" (RFC 9110 10.1.1), and
        417 for another expectation."""
        web = _aiohttp()
        if request.version < (1, 1):  # an HTTP/1.0 client's is ignored (RFC 9110 10.1.1)
            return None
        refused = self._refused(web, request) or _unmet_expectation(web, request)
        if refused is not None:
            return self._refused_before_body(request, refused)
        return await _go_on(request)

    def _refused_before_body(self, request, refused):
        """``refused``, the answer to a request whose body is never read (an ``Expect`` handler's):
        a stop need not wait for the body, and the connection closes after it (a client that
        sent no body and went on with its next request on it had that request read as the
        refused body)."""
        if request.transport is not None:
            self._unread[request.transport] = request.content
        refused.force_close()
        return refused

    async def _no_route(self, request):
        """A path or method the service does not answer: 405 with the path's methods (Allow),
        or 404."""
        web = _aiohttp()
        allowed = ROUTES.get(request.path)
        if allowed is not None:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        raise web.HTTPNotFound()

    async def _expect_elsewhere(self, request):
        """``Expect`` on a request that is not ``POST /caption``: a wrong path or method is
        answered from its headers (a JSON 404 or 405), before a body is sent; a request that is
        answered (GET /health) gets "100 Continue" for ``100-continue`` and a JSON 417 for
        another expectation."""
        web = _aiohttp()
        if request.version < (1, 1):  # an HTTP/1.0 client's is ignored (RFC 9110 10.1.1)
            return None
        allowed = ROUTES.get(request.path)
        if allowed is None:
            refused = _error(web, 404, "Not Found")
        elif request.method not in allowed:
            refused = _error(web, 405, "Method Not Allowed", headers={"Allow": ",".join(allowed)})
        else:
            refused = _unmet_expectation(web, request)
        if refused is not None:
            return self._refused_before_body(request, refused)
        return await _go_on(request)

    async def caption(self, request):
        from edgecap.commands.output import caption_record

        web = _aiohttp()
        options = self.options
        refused = self._refused(web, request)
        if refused is not None:
            return refused
        self.pending += 1
        try:
            t0 = time.perf_counter()
            self._reading.add(request.content)
            try:
                data = await asyncio.wait_for(request.read(), options.read_timeout_s)
            except asyncio.TimeoutError:
                return _error(web, 408, f"the body did not arrive within {options.read_timeout_s:g} s")
            except web.HTTPRequestEntityTooLarge:
                return _too_large(web, None, options.max_body_bytes)
            except ServiceStopping:
                return _error(
                    web,
                    503,
                    "the service is stopping and the body had not all arrived; send it again",
                    headers={"Retry-After": "1"},
                )
            except ConnectionError:  # aiohttp: ConnectionResetError("Connection lost")
                # the client closed its connection while sending the body: its going away, not a
                # failure of the service, and no one is left to read an answer
                of = f" of {request.content_length:,}" if request.content_length is not None else ""
                note(
                    f"{request.method} {request.path} from {request.remote}: the client went away "
                    f"after sending {request.content.total_bytes:,}{of} bytes of its body"
                )
                return _error(web, 400, "the connection closed before the body had all arrived")
            finally:
                self._reading.discard(request.content)
                # a batch waiting for this one asks again (queued below, or never: an error)
                if self.batcher is not None:
                    self.batcher.arrivals_changed()
            if len(data) > options.max_body_bytes:
                return _too_large(web, None, options.max_body_bytes)
            if not data:
                return _error(web, 400, "empty body: send the image file's bytes")
            assert self.batcher is not None
            previous = request.headers.get(PREVIOUS_HEADER)
            result, batch, queue_ms = await self.batcher.submit(data, previous)
            if isinstance(result, InputError):
                return _error(web, 400, f"not a usable image: {_as_a_client_is_told(result.problem)}")
            if isinstance(result, ModelFailure):
                return _error(web, 500, f"the model failed on this image ({result})")
            record = caption_record(result)
            record["timings"] = {
                **{k: round(v, 2) for k, v in result.timings.items()},
                "queue_ms": round(queue_ms, 2),
                "total_ms": round((time.perf_counter() - t0) * 1e3, 2),
            }
            record["batch"] = batch
            if previous is not None:
                record["held"] = result.held
            return web.json_response(record)
        finally:
            self.pending -= 1


def _as_a_client_is_told(problem: str) -> str:
    """An image's problem as an HTTP client is told it: an image over the pixel limit is over
    this service's limit, without the hint to raise it (set_max_pixels, EDGECAP_MAX_PIXELS),
    which only the service's operator can follow (docs/service.md says how)."""
    from edgecap.images import PIXEL_LIMIT_HINT

    if not problem.endswith(PIXEL_LIMIT_HINT):
        return problem
    return problem[: -len(PIXEL_LIMIT_HINT)].replace(
        ", over the limit of ", ", over this service's limit of ", 1
    )


def _unmet_expectation(web, request):
    """A 417 for an ``Expect`` other than ``100-continue`` (RFC 9110 10.1.1), or None."""
    expectation = request.headers.get("Expect", "")
    if expectation.lower() == "100-continue":
        return None
    return _error(web, 417, f"Expect: {expectation[:100]} is not an expectation met here")


async def _go_on(request) -> None:
    """The interim "100 Continue": the client sends its body."""
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim answer is not the response's size


def _forget_built_handlers() -> None:
    """Empty aiohttp's cache of the handlers it built for the requests it answered
    (``aiohttp.web_app._cached_build_middleware``, 1,024 of them), keyed by their application:
    a stopped service stayed in it with its Captioner (the model's memory, its runtime's threads)
    after the program had dropped both, so that a program that made a service anew with a new
    Captioner (another model, other options) held every one it had made (about 70 MB each).
    The other applications in the process have theirs built again on their next request."""
    from aiohttp import web_app

    clear = getattr(getattr(web_app, "_cached_build_middleware", None), "cache_clear", None)
    if callable(clear):
        clear()


def _error(web, status: int, message: str, headers: dict | None = None):
    return web.json_response({"error": message}, status=status, headers=headers)


def _too_large(web, size: int | None, limit: int):
    what = f"{size:,} bytes" if size is not None else "larger"
    return _error(
        web, 413, f"the body is {what}, over the limit of {limit:,} bytes (edgecap serve --max-body-mb)"
    )


def _noting_unread_bodies(web, unread: weakref.WeakKeyDictionary):
    """Note each connection whose request was answered before its body was read to the end."""

    @web.middleware
    async def middleware(request, handler):
        try:
            return await handler(request)
        finally:
            if request.body_exists and not request.content.at_eof() and request.transport is not None:
                unread[request.transport] = request.content

    return middleware


def _json_errors(web):
    """aiohttp's own errors (404, 405, a malformed request) as ``{"error": ...}`` too."""

    @web.middleware
    async def middleware(request, handler):
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(
                web,
                exc.status,
                exc.reason if not exc.text or exc.text.startswith(f"{exc.status}:") else exc.text,
                # its own headers but the body's: a 405's Allow (RFC 9110 15.5.6: it MUST have one)
                headers={
                    k: v
                    for k, v in exc.headers.items()
                    if k.lower() not in ("content-type", "content-length")
                },
            )
        except Exception as exc:  # noqa: BLE001 (a bug: a JSON 500 and one log line, no traceback)
            log(f"{request.method} {request.path} failed ({one_line(exc)})")
            return _error(web, 500, f"internal error ({one_line(exc)})")

    return middleware


def warm_up(captioner, max_batch: int = 1) -> None:
    """``Captioner.warm_up`` before the first request: the runtime's first run (memory, kernels)
    is several times slower than the next ones, and a model that cannot run fails here, before
    listening. At batch 1; with a backend that captures or compiles per batch size (CUDA graphs:
    ``Backend.keeps_sizes``), at every size the service's batches of 1 to ``max_batch`` images
    run at (1, 2, 4, ...), the whole decode's graph of every plan of each included, and, where
    the backend keeps their step-graph shapes beside the host search's own (``hold_fits``), the
    graphs of the pass that scores a client's previous caption (``hold=True``: a request with
    an Edgecap-Previous-Caption header then captures nothing either). What it warns of (more
    graphs than kept, a form of capture that failed) goes to stderr, a line each."""
    backend = captioner.backend
    sizes = {1}
    if backend.keeps_sizes():
        sizes = {backend.run_size(n, max_batch) for n in range(1, max_batch + 1)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        captioner.warm_up(sorted(sizes), frame_size=(224, 224), hold=hold_fits(captioner, sizes))
    for warning in caught:
        if issubclass(warning.category, RuntimeWarning):
            print(f"edgecap serve: warning: {warning.message}", file=sys.stderr)
        else:  # another kind: as Python would have shown it
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def hold_fits(captioner, sizes) -> bool:
    """Whether warming the hold pass at ``sizes`` keeps every step-graph shape the warm-up
    makes: one per size for the hold pass, one per size the search runs on the host (with
    ``search="host"``, or small batches under ``"auto"``). Past what the backend keeps, warming
    it would drop the searches' own shapes, worse than leaving the hold pass to its first
    request."""
    kept = captioner.backend.step_shapes_kept()
    if kept is None:
        return True  # no step-graph shapes kept: none to drop
    on_host = sum(not captioner.backend.warms_search(size, captioner.options) for size in sizes)
    return on_host + len(sizes) <= kept


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


LINGERING_S = 10.0  # aiohttp's default
SHUTDOWN_S = 60.0  # aiohttp's default: how long a stop waits for the requests in flight
PORT_TRIES = 10  # port 0 on a name of several addresses: free ports tried until all have one


async def start(service: CaptionService, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
    """Start serving (in the running event loop); -> (the runner, the port it listens on: the
    one the system chose when ``port`` is 0). Stop with ``await runner.cleanup()``."""
    web = _aiohttp()
    # keepalive: an idle connection is closed after 75 s; no decompression of bodies (a
    # gzip-encoded body would be a decompression bomb past the body limit)
    # lingering: after answering a request whose body was not read (a 413), its rest is read and
    # dropped for up to this long, so that the client can read the answer before the connection
    # closes (a stop does not wait for it: CaptionService._close_unread)
    runner = web.AppRunner(
        service.app,
        # a client that goes away (its timeout) cancels its request's handler: it stops waiting,
        # leaves max_pending, and its queued image is never captioned (aiohttp's default runs
        # the handler to its end, for nobody)
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=75,
        auto_decompress=False,
        lingering_time=LINGERING_S,
        shutdown_timeout=SHUTDOWN_S,
        logger=OneLineLog(logging.getLogger("aiohttp.server"), {}),
    )
    await runner.setup()  # starts the Batcher's task and thread: stopped again on failure
    try:
        for attempt in range(1, PORT_TRIES + 1):
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound = runner.addresses[0][1]
            if port != 0 or all(address[1] == bound for address in runner.addresses):
                return runner, bound
            # a name of several addresses (localhost: ::1 and 127.0.0.1) got a free port each,
            # and only one is announced: all of them on that one instead
            await site.stop()
            again = web.TCPSite(runner, host, bound)
            try:
                await again.start()
                return runner, bound
            except OSError as exc:
                # the port was free on the first address only: another program has it on
                # another (or took it since): another free port (before, "cannot listen")
                await again.stop()  # (not listening: unregistered from the runner)
                if exc.errno != errno.EADDRINUSE or attempt == PORT_TRIES:
                    raise
        raise AssertionError("unreachable")
    except BaseException:
        await runner.cleanup()
        raise


def _stop(stopped: asyncio.Future, signal_number: int) -> None:
    """A signal handler: the server's main() returns the signal's number (once)."""
    if not stopped.done():
        stopped.set_result(signal_number)


def _stopping_signals() -> list:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal: a stop like the others, the requests in
    flight answered; it had been raised inside the event loop, which dropped them unanswered),
    except a SIGHUP that is ignored, as ``nohup`` leaves it."""
    hangup = getattr(signal, "SIGHUP", None)
    keep = hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN
    return [signal.SIGINT, signal.SIGTERM, *([hangup] if keep else [])]


def serve(service: CaptionService, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, ready=None) -> int:
    """Serve until SIGINT, SIGTERM or SIGHUP (one not ignored); -> the signal's number.
    ``ready(port)`` is called once it listens."""

    async def main() -> int:
        runner, bound = await start(service, host, port)
        stopped: asyncio.Future = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        for sig in _stopping_signals():
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # Windows
                loop.add_signal_handler(sig, _stop, stopped, int(sig))
        if ready is not None:
            ready(bound)
        try:
            return await stopped
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def announce(host: str, port: int) -> None:
    shown = f"[{host}]" if ":" in host else host
    print(
        f"edgecap serve: listening on http://{shown}:{port} (POST /caption, GET /health)",
        file=sys.stderr,
        flush=True,
    )

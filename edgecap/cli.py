"""The ``edgecap`` command line. Each subcommand lives in ``edgecap/commands/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> int`` and is imported only when chosen, so
``edgecap caption`` never imports torch."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback
import warnings
from typing import NoReturn

# name -> (module, one-line help)
COMMANDS = {
    "caption": (
        "edgecap.commands.caption",
        "caption photos, folders, globs, a video, a camera or a ROS bag / MCAP recording",
    ),
    "eval": ("edgecap.commands.eval", "score a model on a captioned split (BLEU, METEOR, ROUGE-L, CIDEr)"),
    "train": ("edgecap.commands.train", "train a captioning model (needs edgecap[train])"),
    "export": ("edgecap.commands.export", "export a checkpoint to an ONNX model directory"),
    "convert": ("edgecap.commands.convert", "convert a model directory to FP16 or int8"),
    "build": ("edgecap.commands.build", "build TensorRT engines from a model directory"),
    "serve": (
        "edgecap.commands.serve",
        "a local HTTP caption service for other processes (needs edgecap[serve])",
    ),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's help: descriptions and epilogs as written, and each option's default
    after its help (``(default: 3)``) unless the help already says it or there is none to show
    (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "(default" in text
            or action.default is None
            or action.default is argparse.SUPPRESS
            or isinstance(action.default, bool)
        ):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from edgecap import __version__

    parser = argparse.ArgumentParser(prog="edgecap", description="Fast image captioning.")
    parser.add_argument("--version", action="version", version=f"edgecap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        _load(module).add_arguments(p)
    return parser


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line. A command's PATHs may come before, between and after its options
    (``edgecap caption a.jpg --json b.jpg`` captions both photos; argparse alone reads the PATHs
    up to the first option and calls the rest unrecognized arguments), in their order; after
    ``--`` every argument is a PATH."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    command = commands.get(argv[0]) if argv else None
    if command is None or not any(a.dest == "paths" for a in command._actions):
        return parser.parse_args(argv)  # --version, --help, another command, none
    args, extra = command.parse_known_args(argv[1:])
    end = extra.index("--") if "--" in extra else len(extra)
    unknown = [a for a in extra[:end] if a.startswith("-") and a != "-"]
    if unknown:
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.paths = [*args.paths, *extra[:end], *extra[end + 1 :]]
    args.command = argv[0]
    return args


def _load(module: str):
    return importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C while the command starts (imports, the model loading) just ends it, exit 130:
    # a KeyboardInterrupt raised inside the import machinery or a C extension's initialisation
    # can surface as "Exception ignored" noise or an ImportError. A command that has output to
    # finish properly (caption) calls ``interrupt_normally()`` once it is ready.
    # SIGTERM and SIGHUP (a supervisor's stop: systemd, docker stop, a launch file; a closed
    # terminal) are a Ctrl-C too: at once while the command starts, then its clean-up (a
    # --write-bag copy or a conversion left half-written had blocked the next run), after which
    # ``run_command`` ends the process by the same signal; ``main`` returns 128 + its number.
    del _terminated_by[:]
    previous = _quiet_interrupts()
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warnings(shown)
    try:
        code = _main(argv)
        return 128 + _terminated_by[0] if code == 130 and _terminated_by else code
    finally:
        warnings.showwarning = shown
        for sig, handler in previous.items():
            if handler is not None:  # one not set from Python cannot be set again from it
                signal.signal(sig, handler)


def _one_line_warnings(shown):
    """``warnings.showwarning`` for the command line: a warning raised in edgecap's own code is
    one line, ``edgecap: warning: MESSAGE`` (Python's form adds the module's path, a line number
    and a line of source, which mean nothing to a user of the command); others go to ``shown``."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package):
            from edgecap.commands.output import one_line
            from edgecap.commands.progress import paused_progress

            text = f"edgecap: warning: {one_line(str(message))}"  # a name in it cannot forge a line
            try:
                with paused_progress():  # on a line of its own, not over the progress line
                    print(text, file=sys.stderr if file is None else file)
            except OSError:  # stderr's reader gone (a broken pipe): dropped, as Python's own does
                pass
        else:
            shown(message, category, filename, lineno, file, line)

    return show


def run_command() -> NoReturn:
    """The ``edgecap`` command and ``python -m edgecap``: ``main()``, then the process's end.

    A rank under torchrun (``edgecap train``; ``torch.distributed`` initialised) ends with
    ``os._exit`` once its output is flushed, whatever the command did (an error it printed, an
    uncaught exception, whose traceback is printed first): PyTorch's gloo process group does not
    survive the interpreter's teardown safely (``edgecap.training.distributed``).

    Started with stderr closed (``2>&-``: cron, a daemon), Python's ``sys.stderr`` is None and
    ``print(..., file=sys.stderr)`` would write to stdout, into the records: the messages go to
    the null device instead. A stderr whose reader has gone (a broken pipe: the ``| tee`` or the
    supervisor reading it ended) is pointed there too at its first failed write (``_Stderr``):
    a message that cannot be written is lost, not the records of the inputs after it."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (the process's)
    sys.stderr = _Stderr(sys.stderr)
    try:
        code = main()
    except KeyboardInterrupt:  # while a command that finishes on Ctrl-C was finishing
        code = 128 + _terminated_by[0] if _terminated_by else 130
    except SystemExit as exc:
        if not _in_process_group():
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)  # as Python prints it
    except BaseException:
        if not _in_process_group():
            raise
        traceback.print_exc()
        code = 1
    if _in_process_group():
        _flush_output()
        os._exit(code)
    if _terminated_by:  # cleaned up: the process ends by the signal, as its sender expects
        _flush_output()
        _kill_self(_terminated_by[0])
    sys.exit(code)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: the process still ends here
            pass


def _kill_self(sig: int) -> None:  # pragma: no cover (ends the process)
    """End the process by ``sig`` (its default action): as its sender expects, where an exit
    status of 128 + its number is a failure to systemd, which takes an end by SIGTERM or SIGHUP
    as a clean stop. Returns as PID 1 only (a container without an init), which it spares."""
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


class _Stderr:
    """The command line's ``sys.stderr``: ``stream`` until a write or flush fails (a broken
    pipe, a full disk), then the null device, for it and for the file descriptor (C libraries,
    Python's own flush at exit). The failure had been raised where the message was printed:
    an error line of one input ended the whole run, the later inputs' records lost."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self._to_null()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._to_null()

    def _to_null(self) -> None:
        from edgecap.commands.output import to_null

        if not to_null(self._stream):  # no descriptor (a replaced stream)
            self._stream = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (the process's)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _in_process_group() -> bool:
    distributed = sys.modules.get("torch.distributed")
    return distributed is not None and distributed.is_available() and distributed.is_initialized()


# what stops a command as Ctrl-C does, besides SIGINT: a supervisor's stop, a closed terminal
TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_terminated_by: list[int] = []  # the one of them that stopped this command, once it came


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP while a command runs: a KeyboardInterrupt, so that the command's Ctrl-C
    clean-up runs."""


def _quiet_interrupts() -> dict:
    """Make SIGINT end the process at once with status 130, SIGTERM and SIGHUP with 128 + their
    number (one ignored, as under nohup, stays ignored); -> the previous handlers (none when not
    on the main thread, where handlers cannot be set)."""
    previous: dict = {}
    # a torchrun rank keeps the default: torchrun stops the others with SIGTERM when one fails,
    # and a rank waiting in a collective would run no handler until torchrun's SIGKILL
    terminating = () if _under_torchrun() else TERMINATING
    try:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _exit_130)
        for sig in terminating:
            # (None: a handler not set from Python, an embedding program's: left as it is)
            if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                previous[sig] = signal.signal(sig, _exit_at_once)
    except ValueError:
        pass
    return previous


def _under_torchrun() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:  # not a number: training says so, in its own words
        return False


def _exit_130(signum, frame):  # pragma: no cover (ends the process)
    os._exit(130)


def _exit_at_once(signum, frame):  # pragma: no cover (ends the process)
    _kill_self(signum)  # by the signal itself, as after the clean-up (docs/cli.md)
    os._exit(128 + signum)  # as PID 1


def _terminate(signum, frame):
    terminated(signum)


def terminated(signum: int) -> NoReturn:
    """End the running command as the signal ``signum`` does (a ``Terminated``): its clean-up,
    then the process ends by that signal. The handler of SIGTERM and SIGHUP once a command
    runs; also for a command that handled the signal itself first (``edgecap serve``: a
    SIGHUP's requests in flight answered)."""
    if not _terminated_by:
        _terminated_by.append(signum)
    raise Terminated(f"signal {signum}")


def interrupt_normally() -> None:
    """From here on Ctrl-C raises KeyboardInterrupt again (the command handles it), and SIGTERM
    and SIGHUP a ``Terminated``, which is one."""
    if signal.getsignal(signal.SIGINT) is _exit_130:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in TERMINATING:
        if signal.getsignal(sig) is _exit_at_once:
            signal.signal(sig, _terminate)


def _main(argv: list[str] | None) -> int:
    try:  # Ctrl-C at any moment, the imports of the first fraction of a second included
        args = parse_arguments(argv)
        from edgecap.errors import EdgecapError

        try:
            module = _load(args._module)
            if not getattr(module, "FINISHES_ON_INTERRUPT", False):
                interrupt_normally()
            return int(module.run(args) or 0)
        except EdgecapError as exc:
            if _interrupted(exc):
                return 130
            from edgecap.commands.output import one_line

            print(f"edgecap {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
            return 2
        except Exception as exc:
            from edgecap.errors import gpu_out_of_memory, out_of_memory

            lack = None if _interrupted(exc) else out_of_memory(exc)
            if lack is None:
                raise
            # at --batch-size 1 there is no smaller batch to suggest
            smaller = ", or a smaller --batch-size" if (getattr(args, "batch_size", None) or 0) > 1 else ""
            more = (  # the GPU's memory is not the process's limit
                "free the GPU's memory (other processes on it: nvidia-smi)"
                if gpu_out_of_memory(exc)
                else "allow it more memory (ulimit -v, the container's limit)"
            )
            print(f"edgecap {args.command}: error: out of memory ({lack}): {more}{smaller}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A C extension interrupted while it initialises (onnxruntime) raises ImportError
        # "initialization failed" from the KeyboardInterrupt: still a Ctrl-C.
        if _interrupted(exc):
            return 130
        raise


def _interrupted(exc: BaseException) -> bool:
    from edgecap.errors import caused_by_interrupt

    return caused_by_interrupt(exc)

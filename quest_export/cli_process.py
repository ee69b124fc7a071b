"""Process-level plumbing of the command line: output locks and the interruption message, signal
handling, one-line errors with a failure log, quiet libraries. The commands themselves are in
:mod:`quest_export.cli`."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from quest.version import __version__
from quest_export import interrupts
from quest_export.errors import Interrupted, QuestError, UserError

# per-process CLI state: --debug, the signal that interrupted the run, the outputs this command
# writes (for the one-line interruption message), held output locks, a resumable finetuning state
state: dict = {"debug": False, "signal": None, "outputs": [], "locks": [], "resume_state": None}


def threads() -> None:
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("QUEST_THREADS", os.cpu_count() or 1))))


def lock_output(path: Path) -> None:
    """Hold ``path``'s output lock until the command ends: a second command writing the same
    output refuses (quest_export.locking). Also remembers the output for the interrupt message."""
    import click

    from quest_export.locking import OutputLock

    lock = OutputLock(path).acquire()
    state["locks"].append(lock)
    state["outputs"].append((Path(path), Path(path).exists()))
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(lock.release)


def prepare_out_file(path: Path, force: bool = True) -> Path:
    """An output file (grid, JSON): parent created and writable, lock taken, before any long work."""
    from quest_export.artifacts import check_writable_file

    path = check_writable_file(path, force=True)
    lock_output(path)
    return check_writable_file(path, force=force)


def prepare_out_dir(out: Path, force: bool) -> None:
    """Up front: refuse an unwritable parent, take the output lock (another command writing the same
    --out is refused), then refuse an existing output directory without --force."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {parent}: {exc.strerror}; choose another --out") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"{parent} is not writable; choose another --out")
    lock_output(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it or choose another --out")


def quiet_libraries() -> None:
    """Keep library chatter (loading bars, deprecation notes) out of the CLI's output."""
    if "--debug" in sys.argv:
        return
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def on_signal(signum: int, _frame: object) -> None:
    """SIGINT and SIGTERM both raise KeyboardInterrupt (as Interrupted), so every cleanup runs."""
    state["signal"] = signal.Signals(signum).name
    interrupts.record(state["signal"])  # seen by every artifact commit even if this raise is swallowed
    raise Interrupted


def _unraisable(hook_args) -> None:
    """An Interrupted swallowed by a finaliser is not noise on stderr: it was recorded (interrupts)
    and stops the command at its next artifact commit. Anything else goes to Python's own hook."""
    if isinstance(hook_args.exc_value, Interrupted):
        return
    sys.__unraisablehook__(hook_args)


def install_signal_handlers() -> None:
    sys.unraisablehook = _unraisable
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, on_signal)
        except (ValueError, OSError):  # not the main thread
            pass


def interrupted_line() -> str:
    """One line for an interrupted command: which signal, what happened to its outputs, how to resume."""
    parts = [f"interrupted by {state['signal'] or 'SIGINT'}"]
    for path, existed in state["outputs"]:
        parts.append(f"partial output removed, {path} " + ("keeps its previous content" if existed else "was not written"))
    kept = state.get("resume_state")
    if kept is not None and Path(kept).is_file():
        parts.append(f"the finetuning state is kept in {kept}: rerun the same command with --resume")
    return "error: " + "; ".join(parts)


def log_dir() -> Path:
    """Where failure logs go: $QUEST_EXPORT_LOG_DIR, else $XDG_CACHE_HOME (or ~/.cache)/quest-export/logs."""
    if os.environ.get("QUEST_EXPORT_LOG_DIR"):
        return Path(os.environ["QUEST_EXPORT_LOG_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "quest-export" / "logs"


def write_failure_log(exc: BaseException) -> Path | None:
    """The full traceback of a runtime failure, with the command line and versions; its path or None."""
    import platform
    import tempfile
    import traceback

    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "quest-export")
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{os.getpid()}.log"
    text = "".join([
        f"command: {' '.join(sys.argv)}\n",
        f"quest-export {__version__}, Python {platform.python_version()}, {platform.platform()}\n",
        f"time: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n\n",
        *traceback.format_exception(type(exc), exc, exc.__traceback__),
    ])
    for directory in (log_dir(), Path(tempfile.gettempdir()) / "quest-export-logs"):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(text)
            return directory / name
        except OSError:
            continue
    return None


def disk_full(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain that says the disk (or quota) is full, if any."""
    import errno

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        text = str(current)
        if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text:
            return current
        current = current.__cause__ or current.__context__
    return None


def runtime_failure_line(exc: BaseException) -> str:
    """One line for a runtime failure (exit 1), naming the log that holds the traceback."""
    log = write_failure_log(exc)
    where = f"traceback in {log}" if log is not None else "no log could be written"
    full = disk_full(exc)
    if full is not None:
        written = ", ".join(str(p) for p, _ in state["outputs"]) or getattr(full, "filename", None) or "the output"
        return (f"error: no space left on device while writing {written}; free space or choose another --out "
                f"(partial output removed; {where})")
    if isinstance(exc, QuestError):
        return f"error: {exc} ({where})"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"error: {type(exc).__name__}: {first} ({where}; rerun with --debug to print it)"


def release_locks() -> None:
    while state["locks"]:
        state["locks"].pop().release()


def run_app(app) -> None:
    """Run the Typer app: user errors exit 2 with one line, runtime failures exit 1 with one line
    naming a log file, interruptions (SIGINT, SIGTERM) exit 130 after cleanup."""
    quiet_libraries()
    install_signal_handlers()
    try:
        app()
    except SystemExit as exc:
        if exc.code in (0, None) and interrupts.pending():  # the handler's raise was swallowed (a finaliser)
            print(interrupted_line(), file=sys.stderr)
            sys.exit(130)
        if exc.code == 130:  # Typer turns KeyboardInterrupt into exit 130 after the cleanup ran
            print(interrupted_line(), file=sys.stderr)
        raise
    except KeyboardInterrupt:  # raised outside Typer's handling (e.g. while starting up)
        print(interrupted_line(), file=sys.stderr)
        sys.exit(130)
    except QuestError as exc:
        if state["debug"]:
            raise
        code = getattr(exc, "exit_code", 2)
        print(runtime_failure_line(exc) if code == 1 else f"error: {exc}", file=sys.stderr)
        sys.exit(code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if state["debug"]:
            raise
        print(runtime_failure_line(exc), file=sys.stderr)
        sys.exit(1)
    finally:
        release_locks()

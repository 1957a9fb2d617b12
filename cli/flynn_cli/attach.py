"""An attached job as `flynn run` and `flynn pg` see it: the job's stdio over the controller's
attach connection (`Client.run_job_attached`), in Flynn's frames.

Output frames go to stdout (stream 1) or stderr (2, and 3, the init log); stdin is pumped as
data frames by a thread (a terminal, a pipe or a file read alike), ending with an empty frame.
With a TTY the local terminal is in raw mode for the session (always restored), and a window
size change is sent as a resize frame and SIGWINCH. Without one, SIGINT and SIGTERM are passed
on to the job, and 10 s after the first of them SIGKILL is. The job's exit frame gives the
session's status; an error frame or a connection that ends before the exit is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from flynn_controller.client import Client

from flynn_cli.output import CommandError
from flynn_host.runtime import attach

KILL_AFTER = 10.0  # seconds from a forwarded SIGINT/SIGTERM to SIGKILL
SIGWINCH = 28  # the number Flynn's frames carry, whatever the local platform's is
READ_SIZE = 65536


@dataclass
class Stdio:
    """Where a session's input comes from and its output goes. `read(n)` returns b"" at the
    end of the input; `None` sends no input at all (only the EOF frame)."""

    read: Callable[[int], bytes] | None = None
    stdout: BinaryIO = field(default_factory=lambda: sys.stdout.buffer)
    stderr: BinaryIO = field(default_factory=lambda: sys.stderr.buffer)


def std_stdio() -> Stdio:
    """The process's own stdio (stdin read unbuffered, as a terminal needs)."""
    return Stdio(read=lambda n: os.read(0, n))


def is_terminal() -> bool:
    """Whether a run gets a TTY: stdin and stdout are both terminals."""
    return os.isatty(0) and os.isatty(1)


def terminal_size() -> tuple[int, int]:
    """(columns, lines) of the terminal on stdout."""
    size = os.get_terminal_size(1)
    return size.columns, size.lines


@contextlib.contextmanager
def raw_terminal() -> Iterator[None]:
    """The terminal on stdin in raw mode, restored whatever happens."""
    saved = termios.tcgetattr(0)
    # TCSANOW, not setraw's default TCSAFLUSH, which would drop what was typed meanwhile
    tty.setraw(0, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def run_attached(
    client: Client, app: str, new_job: dict[str, Any], stdio: Stdio | None = None
) -> int:
    """Run `new_job` attached; its exit status. The session is a TTY one when the job asks
    for a TTY (`new_job["tty"]`), which needs a terminal on stdin and stdout."""
    stdio = stdio or std_stdio()
    if new_job.get("tty"):
        with raw_terminal():
            return asyncio.run(_session(client, app, new_job, stdio, True))
    return asyncio.run(_session(client, app, new_job, stdio, False))


async def _session(
    client: Client, app: str, new_job: dict[str, Any], stdio: Stdio, is_tty: bool
) -> int:
    loop = asyncio.get_running_loop()
    reader, writer = await client.run_job_attached(app, new_job)

    def send(frame: bytes) -> None:
        if not writer.is_closing():
            writer.write(frame)

    def send_threadsafe(frame: bytes) -> None:
        with contextlib.suppress(RuntimeError):  # the session is over: the loop is closed
            loop.call_soon_threadsafe(send, frame)

    threading.Thread(target=_pump, args=(stdio.read, send_threadsafe), daemon=True).start()
    handled: list[int] = []
    if is_tty:

        def on_winch() -> None:
            with contextlib.suppress(OSError):
                columns, lines = terminal_size()
                send(attach.resize_frame(lines, columns))
                send(attach.signal_frame(SIGWINCH))

        loop.add_signal_handler(signal.SIGWINCH, on_winch)
        handled.append(signal.SIGWINCH)
    else:
        killer: list[asyncio.TimerHandle] = []

        def forward(sig: int) -> None:
            send(attach.signal_frame(sig))
            if not killer:
                killer.append(loop.call_later(KILL_AFTER, send, attach.signal_frame(9)))

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, forward, int(sig))
            handled.append(sig)
    try:
        return await _read_frames(reader, stdio)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        writer.close()


def _pump(read: Callable[[int], bytes] | None, send: Callable[[bytes], None]) -> None:
    """Send the input as stdin frames, then the empty frame that ends it (a thread: stdin
    may be a terminal, a pipe or a file, which asyncio reads differently)."""
    while read is not None:
        try:
            data = read(READ_SIZE)
        except OSError:
            data = b""
        if not data:
            break
        send(attach.data_frame(attach.STDIN, data))
    send(attach.data_frame(attach.STDIN, b""))


async def _read_frames(reader: asyncio.StreamReader, stdio: Stdio) -> int:
    while True:
        try:
            frame = await attach.read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            frame = None
        except ValueError as e:
            raise CommandError(str(e)) from None
        if frame is None:
            raise CommandError("EOF")
        if frame.kind == "data":
            out = stdio.stdout if frame.stream == attach.STDOUT else stdio.stderr
            if frame.data:
                out.write(frame.data)
                out.flush()
        elif frame.kind == "exit":
            return frame.status or 0
        elif frame.kind == "error":
            raise CommandError(frame.message or "attach error")

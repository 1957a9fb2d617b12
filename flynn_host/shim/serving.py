"""The per-job shim: owns one container so it outlives restarts of the daemon.

The daemon prepares a job directory (`bundle/` and `shim.json`) and runs
`python -m flynn_host.shim JOBDIR` in a new session. The shim makes itself a child subreaper,
starts the container with `runc run --detach`, reports `{"pid": N}` (or `{"error": "..."}`) as
one JSON line on its stdout, and then, until the container's init exits: logs its output
(`logs.LogWriter`), and serves `JOBDIR/attach.sock`, where each client sends one JSON request
line (`attach`, `follow_logs`, `wait`, `signal` or `status`). On exit it drains the output,
writes `JOBDIR/exit.json` atomically, tells its clients, and exits; the daemon removes the
container with `runc delete` after reading its cgroup. Stdlib only, so it starts fast.

Signals for the job go to tini (PID 1), which passes them to the job's process group, except
SIGSTOP and SIGCONT: tini cannot pass on a SIGSTOP (it would only stop tini itself), and a
SIGCONT must resume every process the SIGSTOP stopped, so those two go to every process of the
container through `runc kill --all`. SIGKILL needs no help: when PID 1 of a pid namespace dies,
the kernel kills every other process in it.

Every file the shim makes is root's alone (0600): the job's log shows what the job prints,
secrets included, and its directory is the daemon's private run directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flynn_host.atomicfile import write_atomic
from flynn_host.logs import LogWriter, encode_entry, format_entry, read_entries

if TYPE_CHECKING:
    import asyncio

    from flynn_host import attach


def load_serving_modules() -> None:
    """Import what serving needs. asyncio alone costs ~35 ms, so it is imported after the
    container has started and its pid is reported, off the job's start latency."""
    global asyncio, attach
    import asyncio

    from flynn_host import attach


PR_SET_CHILD_SUBREAPER = 36
RUNC_TIMEOUT = 60.0  # runc run --detach takes well under a second; a hang must not block forever
DRAIN_TIMEOUT = 2.0  # grandchildren may keep the output pipes open after init exits
CLIENT_LINGER = 2.0  # how long an attach client may take to close after its exit frame
CLIENT_FLUSH_TIMEOUT = 5.0  # how long clients get to take the last output before the shim exits
CLIENT_BUFFER_LIMIT = 8 * 1024 * 1024  # a client this far behind is dropped, not waited for
RUNC_KILL_TIMEOUT = 10.0  # `runc kill --all` freezes, signals and thaws: well under a second
READ_SIZE = 64 * 1024
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL

STREAM_NUMBERS = {"stdout": 1, "stderr": 2}  # attach.STDOUT, attach.STDERR
# signals that go to every process of the container (`runc kill --all`), not to tini
EVERY_PROCESS_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGCONT})


@dataclass
class ShimConfig:
    """`shim.json`, written by the daemon."""

    job_id: str
    runc: str
    runc_root: str
    bundle: str
    log_file: str
    log_max_bytes: int
    tty: bool = False
    stdin: bool = False
    height: int = 0
    width: int = 0

    @classmethod
    def load(cls, path: str) -> ShimConfig:
        with open(path) as f:
            raw = json.load(f)
        return cls(
            job_id=raw["job_id"],
            runc=raw["runc"],
            runc_root=raw["runc_root"],
            bundle=raw["bundle"],
            log_file=raw["log_file"],
            log_max_bytes=int(raw["log_max_bytes"]),
            tty=bool(raw.get("tty", False)),
            stdin=bool(raw.get("stdin", False)),
            height=int(raw.get("height") or 0),
            width=int(raw.get("width") or 0),
        )


class StartError(Exception):
    """The container could not be started; the message goes to the daemon as `{"error"}`."""


# --- small helpers ------------------------------------------------------------------------


def set_subreaper() -> None:
    """Become the parent of the container's init once runc (its real parent) exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


@contextlib.contextmanager
def unix_path(path: str) -> Iterator[str]:
    """A name for `path` usable with bind/connect even past the 107-byte sun_path limit.

    Job directories can be deep (job ids are up to 128 characters); a long path is reached
    through an O_PATH descriptor of its directory, `/proc/self/fd/N/name`.
    """
    if len(os.fsencode(path)) <= UNIX_PATH_MAX:
        yield path
        return
    dir_fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}"
    finally:
        os.close(dir_fd)


def listen_unix(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # the socket is created 0600 by bind itself (no moment where others could connect); the
    # umask is the only way to say so, and the shim is single-threaded while it starts
    umask = os.umask(0o177)
    try:
        with unix_path(path) as name:
            sock.bind(name)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(umask)
    return sock


def create_private(path: str) -> None:
    """Create `path` empty and 0600 unless it exists (for files another program appends to)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))


def set_tty_size(fd: int, height: int, width: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def get_tty_size(fd: int) -> tuple[int, int]:
    height, width, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return height, width


def exit_info(wait_status: int) -> dict[str, int | None]:
    """`{"status", "signal"}` from a waitpid status; a signal death is status 128+signal."""
    code = os.waitstatus_to_exitcode(wait_status)
    if code < 0:
        return {"status": 128 - code, "signal": -code}
    return {"status": code, "signal": None}


def _read_available(fd: int, limit: int = 1024 * 1024) -> bytes:
    """Whatever can be read from a non-blocking `fd` right now, up to `limit` bytes."""
    out = bytearray()
    while len(out) < limit:
        try:
            data = os.read(fd, READ_SIZE)
        except (BlockingIOError, OSError):
            break
        if not data:
            break
        out += data
    return bytes(out)


def _json_line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# --- clients ------------------------------------------------------------------------------


class Subscriber:
    """A client that receives output as it happens.

    While its replay (log entries from the files) is being written, live data is held back so
    it cannot overtake the replay. A client that falls too far behind is disconnected rather
    than slowing the container down or growing the shim without bound; one that closes its
    end is gone too (Flynn clients end their stdin with an empty frame, not by shutting down).
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.held: list[bytes] | None = []
        self.held_bytes = 0
        self.gone = asyncio.Event()

    def send(self, data: bytes) -> None:
        if self.gone.is_set():
            return
        if self.writer.is_closing():
            self.gone.set()
            return
        if self.held is not None:
            self.held.append(data)
            self.held_bytes += len(data)
            behind = self.held_bytes
        else:
            self.writer.write(data)
            behind = self.writer.transport.get_write_buffer_size()
        if behind > CLIENT_BUFFER_LIMIT:
            self.writer.transport.abort()
            self.gone.set()

    async def release(self) -> None:
        """The replay is written: send what was held and from now on write directly."""
        held, self.held = self.held or [], None
        if not self.gone.is_set():
            for data in held:
                self.writer.write(data)
            await self.writer.drain()

    async def wait_for(self, finished: asyncio.Event) -> bool:
        """Wait until `finished` is set or the client is gone; True if it is still there."""
        waiters = [asyncio.ensure_future(finished.wait()), asyncio.ensure_future(self.gone.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return not self.gone.is_set()


async def _write_all(writer: asyncio.StreamWriter, chunks: Iterator[bytes]) -> None:
    """Write `chunks`, waiting for the client now and then so a big replay is not all in memory."""
    pending = 0
    for chunk in chunks:
        writer.write(chunk)
        pending += len(chunk)
        if pending >= READ_SIZE:
            await writer.drain()
            pending = 0
    await writer.drain()


# --- the shim -----------------------------------------------------------------------------


class Shim:
    """One job's container: started by `start()` (blocking), then served by `serve()`."""

    def __init__(self, job_dir: str, config: ShimConfig) -> None:
        self.job_dir = job_dir
        self.config = config
        self.pid = 0
        self.log: LogWriter | None = None
        self.server_sock: socket.socket | None = None
        # our ends of the container's stdio
        self.outputs: dict[int, str] = {}  # fd -> stream name
        self.stdin_fd: int | None = None
        self._ours: set[int] = set()  # every descriptor above, to close if the start fails
        self.master: int | None = None  # pty master, tty jobs only
        self.stdin: asyncio.StreamWriter | None = None  # writes to the stdin pipe or the pty
        self.exit: dict[str, int | None] | None = None  # {"status", "signal"} once init exited
        # made in serve(): asyncio is only imported once the container runs
        self.exited: asyncio.Event  # init has exited
        self.outputs_done: asyncio.Event  # every output reached EOF
        self.finished: asyncio.Event  # output drained, log closed, exit.json written
        self.watchers: list[tuple[Subscriber, frozenset[str]]] = []
        self.followers: list[tuple[Subscriber, int]] = []
        self.clients: set[asyncio.Task[Any]] = set()
        # our own short-lived children (`runc kill`): the reaper hands them their wait status
        self.helpers: dict[int, asyncio.Future[int]] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.job_dir, name)

    # --- start ----------------------------------------------------------------------------

    def start(self) -> int:
        """Start the container; return its init pid or raise StartError, leaving nothing behind."""
        cfg = self.config
        theirs: list[int] = []  # runc's ends of the stdio pipes, closed once runc has run
        console_sock = console_path = None
        try:
            self.log = LogWriter(cfg.log_file, cfg.log_max_bytes)
            self.server_sock = listen_unix(self.path("attach.sock"))
            if cfg.tty:
                console_path = self.path("console.sock")
                if len(os.fsencode(console_path)) > UNIX_PATH_MAX:
                    # runc connects by name, so a deep job directory needs a short private one
                    import tempfile

                    console_path = os.path.join(tempfile.mkdtemp(prefix="flynn-shim-"), "c.sock")
                console_sock = listen_unix(console_path)

            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            theirs.append(devnull)
            # Without a tty runc's stdio becomes the container's; with one, runc's stderr
            # only carries its error message.
            err_r, err_w = self._pipe(theirs, ours_reads=True)
            if cfg.tty:
                stdio = (devnull, devnull, err_w)
            else:
                out_r, out_w = self._pipe(theirs, ours_reads=True)
                self.outputs = {out_r: "stdout", err_r: "stderr"}
                in_r = devnull
                if cfg.stdin:
                    in_r, self.stdin_fd = self._pipe(theirs, ours_reads=False)
                stdio = (in_r, out_w, err_w)
            returncode = self._run_runc(stdio, console_path)
            # the container holds its own copies now; ours would keep the pipes from EOF
            for fd in theirs:
                os.close(fd)
            theirs.clear()

            if returncode != 0:
                os.set_blocking(err_r, False)
                raise StartError(self._runc_error(returncode, _read_available(err_r)))
            with open(self.path("container.pid")) as f:
                self.pid = int(f.read().strip())
            if console_sock is not None:
                self.master = self._receive_console(console_sock)
                self._close(err_r)
        except BaseException:
            for fd in theirs:
                os.close(fd)
            self._abandon_start()
            raise
        finally:
            if console_sock is not None and console_path is not None:
                console_sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(console_path)
                if os.path.dirname(console_path) != self.job_dir:
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.dirname(console_path))
        return self.pid

    def _run_runc(self, stdio: tuple[int, int, int], console_path: str | None) -> int | None:
        cfg = self.config
        create_private(self.path("runc.log"))  # runc would make it 0644; it appends to ours
        args = [cfg.runc, "--root", cfg.runc_root, "--log", self.path("runc.log")]
        args += ["--log-format", "json", "run", "--detach"]
        args += ["--pid-file", self.path("container.pid"), "--bundle", cfg.bundle]
        if console_path is not None:
            args += ["--console-socket", console_path]
        args.append(cfg.job_id)
        proc = subprocess.Popen(args, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])
        # wait on a pidfd: subprocess's own timed wait polls with sleeps of up to 50 ms,
        # which showed up as the largest avoidable part of a job's start latency
        pidfd = os.pidfd_open(proc.pid)
        try:
            ready, _, _ = select.select([pidfd], [], [], RUNC_TIMEOUT)
        finally:
            os.close(pidfd)
        if not ready:
            proc.kill()
            proc.wait()
            return None
        return proc.wait()

    def _runc_error(self, returncode: int | None, stderr: bytes) -> str:
        """The best description of a failed `runc run`: runc's own log, else its stderr."""
        last = last_error = None
        with contextlib.suppress(OSError), open(self.path("runc.log"), "rb") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("msg"):
                    last = entry["msg"]
                    if entry.get("level") in ("error", "fatal", "panic"):
                        last_error = entry["msg"]
        if last_error or last:
            return str(last_error or last)
        lines = stderr.decode("utf-8", errors="replace").strip().splitlines()
        if lines:
            return lines[-1]
        if returncode is None:
            return f"runc run did not finish within {RUNC_TIMEOUT:.0f}s"
        return f"runc run exited with status {returncode}"

    def _receive_console(self, sock: socket.socket) -> int:
        """The pty master runc sent over the console socket (it is queued there already)."""
        sock.settimeout(10)
        try:
            conn, _ = sock.accept()
            with conn:
                _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        except OSError as e:
            raise StartError(f"receiving the container's console: {e}") from e
        if not fds:
            raise StartError("runc did not send the container's console")
        master = fds[0]
        if self.config.height > 0 and self.config.width > 0:
            set_tty_size(master, self.config.height, self.config.width)
        elif get_tty_size(master) == (0, 0):
            set_tty_size(master, 24, 80)
        self.outputs = {master: "stdout"}
        return master

    def _pipe(self, theirs: list[int], ours_reads: bool) -> tuple[int, int]:
        """A pipe between the shim and runc: our end is kept in `_ours`, runc's in `theirs`."""
        r, w = os.pipe()
        mine, other = (r, w) if ours_reads else (w, r)
        self._ours.add(mine)
        theirs.append(other)
        return r, w

    def _close(self, fd: int) -> None:
        self._ours.discard(fd)
        os.close(fd)

    def _abandon_start(self) -> None:
        """Undo a failed start: remove whatever runc created, close and unlink our ends."""
        subprocess.run(
            [self.config.runc, "--root", self.config.runc_root, "delete", "--force"]
            + [self.config.job_id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        for fd in list(self._ours):
            self._close(fd)
        if self.master is not None:
            os.close(self.master)
            self.master = None
        if self.server_sock is not None:
            self.server_sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path("attach.sock"))
        if self.log is not None:
            self.log.close()

    # --- run ------------------------------------------------------------------------------

    async def serve(self) -> int:
        """Run until the container has exited and its exit has been recorded and announced."""
        assert self.log is not None and self.server_sock is not None
        self.exited = asyncio.Event()
        self.outputs_done = asyncio.Event()
        self.finished = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        self._reap()  # init may have exited before runc did

        for fd, stream in self.outputs.items():
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._read_output, fd, stream)
        if not self.outputs:
            self.outputs_done.set()
        stdin_fd = self.stdin_fd if self.master is None else os.dup(self.master)
        if stdin_fd is not None:
            self.stdin = await _pipe_writer(stdin_fd)
        self.log.listeners.append(self._log_entry)

        server = await asyncio.start_unix_server(self._client, sock=self.server_sock)
        await self.exited.wait()
        assert self.exit is not None
        try:
            await asyncio.wait_for(self.outputs_done.wait(), DRAIN_TIMEOUT)
        except TimeoutError:
            for fd in list(self.outputs):
                self._read_output(fd, self.outputs[fd], final=True)
        self.log.close()
        write_atomic(self.path("exit.json"), _json_line(self.exit), mode=0o600)
        if self.stdin is not None and not self.stdin.is_closing():
            self.stdin.transport.abort()
        self.finished.set()
        # no new clients from here: one accepted now would be cut off when the shim exits;
        # refused, it falls back to the log file and exit record the daemon keeps
        server.close()

        if self.clients:
            _, stuck = await asyncio.wait(self.clients, timeout=CLIENT_FLUSH_TIMEOUT)
            for task in stuck:
                task.cancel()
        with contextlib.suppress(OSError):
            os.unlink(self.path("attach.sock"))
        if self.master is not None:
            os.close(self.master)
        return 0

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.pid and not self.exited.is_set():
                self.exit = exit_info(status)
                self.exited.set()
            helper = self.helpers.pop(pid, None)
            if helper is not None and not helper.done():
                helper.set_result(status)

    def _read_output(self, fd: int, stream: str, final: bool = False) -> None:
        try:
            data = _read_available(fd) if final else os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO from a pty master once every slave is closed: the end of output
        if data:
            frame = attach.data_frame(STREAM_NUMBERS[stream], data)
            for sub, streams in list(self.watchers):
                if stream in streams:
                    sub.send(frame)
            assert self.log is not None
            self.log.write(stream, data)
        if not data or final:
            asyncio.get_running_loop().remove_reader(fd)
            del self.outputs[fd]
            if fd != self.master:
                self._close(fd)
            if not self.outputs:
                self.outputs_done.set()

    def _log_entry(self, entry: dict[str, Any]) -> None:
        if not self.followers:
            return
        line = encode_entry(entry)
        for sub, since in list(self.followers):
            if entry["n"] > since:
                sub.send(line)

    # --- clients ------------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # every accepted connection is waited for at exit, also one whose request is still
        # unread: cut off, it would lose the end of its replay and the exit status
        task = asyncio.current_task()
        assert task is not None
        self.clients.add(task)
        task.add_done_callback(self.clients.discard)
        try:
            await self._serve_client(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception:
            import traceback

            traceback.print_exc()  # a bug in one client's handling must not end the shim
        finally:
            writer.close()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await reader.readline()
            if not line:
                return
            request = json.loads(line)
            if not isinstance(request, dict) or len(request) != 1:
                raise ValueError("request must be an object with exactly one key")
        except ValueError as e:
            writer.write(_json_line({"error": f"invalid request: {e}"}))
            await writer.drain()
            return
        ((kind, arg),) = request.items()
        try:
            if kind == "attach":
                await self._attach(arg, reader, writer)
            elif kind == "follow_logs":
                await self._follow_logs(arg, reader, writer)
            elif kind == "wait":
                await self.finished.wait()
                writer.write(_json_line({"exit": self.exit}))
            elif kind == "signal":
                writer.write(_json_line(await self._signal(arg)))
            elif kind == "status":
                writer.write(_json_line({"pid": self.pid, "running": not self.exited.is_set()}))
            else:
                raise ValueError(f"unknown request {kind!r}")
        except (ValueError, TypeError, KeyError) as e:
            writer.write(_json_line({"error": f"invalid {kind} request: {e}"}))
        await writer.drain()

    async def _signal(self, sig: Any) -> dict[str, Any]:
        if not isinstance(sig, int) or isinstance(sig, bool) or not 0 < sig < signal.NSIG:
            raise ValueError(f"{sig!r} is not a signal number")
        if self.exited.is_set():
            return {"error": "the job has exited"}
        if sig in EVERY_PROCESS_SIGNALS:
            return await self._signal_every_process(sig)
        try:
            os.kill(self.pid, sig)
        except OSError as e:
            return {"error": f"signalling pid {self.pid}: {e.strerror}"}
        return {"ok": True}

    async def _signal_every_process(self, sig: int) -> dict[str, Any]:
        """`runc kill --all`: runc freezes the container's cgroup, signals each process in it
        and thaws it, so none escapes by forking meanwhile."""
        cfg = self.config
        args = [cfg.runc, "--root", cfg.runc_root, "kill", "--all", cfg.job_id, str(sig)]
        err_r, err_w = os.pipe()
        try:
            # spawned, not run through asyncio's subprocess support: the shim reaps every child
            # itself (it is a subreaper), so the status comes from `_reap`; spawning does not
            # wait for the child
            pid = os.posix_spawn(  # noqa: ASYNC221
                cfg.runc,
                args,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ],
            )
        except OSError as e:
            os.close(err_r)
            return {"error": f"runc kill: {e.strerror}"}
        finally:
            os.close(err_w)
        done = asyncio.get_running_loop().create_future()
        self.helpers[pid] = done
        try:
            status = await asyncio.wait_for(done, RUNC_KILL_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)  # reaped by `_reap` like any child
            return {"error": f"runc kill did not finish within {RUNC_KILL_TIMEOUT:.0f}s"}
        finally:
            os.set_blocking(err_r, False)
            stderr = _read_available(err_r)
            os.close(err_r)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            lines = stderr.decode(errors="replace").strip().splitlines()
            return {"error": f"runc kill: {lines[-1] if lines else f'exit status {code}'}"}
        return {"ok": True}

    async def _follow_logs(
        self, arg: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        since = arg.get("since", 0) if isinstance(arg, dict) else None
        if not isinstance(since, int) or since < 0:
            raise ValueError("since must be a non-negative integer")
        assert self.log is not None
        # reading the files and subscribing happen without a yield in between: no gap
        entries = read_entries(self.config.log_file, since=since)
        sub = Subscriber(writer)
        entry = (sub, since)
        self.followers.append(entry)
        hangup = asyncio.create_task(_watch_hangup(reader, sub))
        try:
            await _write_all(writer, map(encode_entry, entries))
            await sub.release()
            if not await sub.wait_for(self.finished):
                return
        finally:
            self.followers.remove(entry)
            hangup.cancel()
        writer.write(_json_line({"exit": self.exit}))

    async def _attach(
        self, arg: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not isinstance(arg, dict):
            raise ValueError("attach must be an object")
        flags, height, width = (arg.get(k) or 0 for k in ("flags", "height", "width"))
        lines = arg.get("lines")
        for name, value in (("flags", flags), ("height", height), ("width", width)):
            if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
                raise ValueError(f"{name} must be an integer from 0 to 65535")
        if lines is not None and not isinstance(lines, int):
            raise ValueError("lines must be an integer or null")
        streams = frozenset(
            name
            for name, flag in (("stdout", attach.ATTACH_STDOUT), ("stderr", attach.ATTACH_STDERR))
            if flags & flag
        )
        if self.master is not None and height > 0 and width > 0:
            set_tty_size(self.master, height, width)

        assert self.log is not None
        entries: list[dict[str, Any]] = []
        if flags & attach.ATTACH_LOGS and streams:
            # a pending partial line goes into the log now, so it is replayed exactly once
            self.log.flush_partial()
            entries = read_entries(self.config.log_file, lines=lines, streams=set(streams))
        sub = Subscriber(writer)
        watcher = (sub, streams)
        streaming = bool(flags & attach.ATTACH_STREAM)
        if streaming:
            self.watchers.append(watcher)
        use_stdin = bool(flags & attach.ATTACH_STDIN) and self.stdin is not None
        inputs = asyncio.create_task(self._client_input(reader, use_stdin, sub))
        try:
            await _write_all(
                writer,
                (attach.data_frame(STREAM_NUMBERS[e["s"]], format_entry(e)) for e in entries),
            )
            if not streaming:
                return
            await sub.release()
            if not await sub.wait_for(self.finished):
                return
        finally:
            if streaming:
                self.watchers.remove(watcher)
            inputs.cancel()
        for name in ("stdout", "stderr"):
            if name in streams:
                writer.write(attach.data_frame(STREAM_NUMBERS[name], b""))
        assert self.exit is not None
        writer.write(attach.exit_frame(self.exit["status"] or 0))
        # half-close and read what the client still sends until it closes: closing with its
        # input unread would reset the connection and could lose the frames just written
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(_discard_until_eof(reader), CLIENT_LINGER)

    async def _client_input(
        self, reader: asyncio.StreamReader, use_stdin: bool, sub: Subscriber
    ) -> None:
        """Apply the frames an attach client sends: stdin data, resizes and signals."""
        try:
            while True:
                frame = await attach.read_frame(reader)
                if frame is None:
                    sub.gone.set()
                    return
                if frame.kind == "data" and frame.stream == attach.STDIN and use_stdin:
                    await self._write_stdin(frame.data)
                elif frame.kind == "resize" and self.master is not None:
                    set_tty_size(self.master, frame.height or 0, frame.width or 0)
                elif frame.kind == "signal" and frame.signal:
                    with contextlib.suppress(ValueError):
                        await self._signal(frame.signal)
        except (ValueError, OSError, asyncio.IncompleteReadError):
            sub.gone.set()  # a broken client only loses its own connection

    async def _write_stdin(self, data: bytes) -> None:
        stdin = self.stdin
        if stdin is None or stdin.is_closing():
            return
        if not data:
            if self.master is not None:
                stdin.write(b"\x04")  # a tty has no EOF of its own: send ^D, as a terminal does
            else:
                stdin.close()
                self.stdin = None
                return
        else:
            stdin.write(data)
        with contextlib.suppress(ConnectionError):
            await stdin.drain()


async def _discard_until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(READ_SIZE):
        pass


async def _watch_hangup(reader: asyncio.StreamReader, sub: Subscriber) -> None:
    """Notice when a client that only listens closes its connection."""
    with contextlib.suppress(OSError):
        while await reader.read(READ_SIZE):
            pass
    sub.gone.set()


async def _pipe_writer(fd: int) -> asyncio.StreamWriter:
    """An asyncio writer for the container's stdin (a pipe, or a dup of the pty master)."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.streams.FlowControlMixin(loop=loop), os.fdopen(fd, "wb", buffering=0)
    )
    return asyncio.StreamWriter(transport, protocol, None, loop)


# --- clients of the shim (used by the daemon) ---------------------------------------------


async def connect_shim(job_dir: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a job's shim socket (also when the job directory's path is long)."""
    load_serving_modules()
    with unix_path(os.path.join(job_dir, "attach.sock")) as name:
        # log lines reach 64 KiB before JSON escaping: allow longer lines than asyncio's default
        return await asyncio.open_unix_connection(name, limit=1 << 20)


async def shim_request(job_dir: str, request: dict[str, Any]) -> dict[str, Any]:
    """Send a one-reply request (`wait`, `signal`, `status`) and return the reply."""
    reader, writer = await connect_shim(job_dir)
    try:
        writer.write(_json_line(request))
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
    if not line:
        raise ConnectionError("the shim closed the connection without replying")
    return json.loads(line)


# --- entry point --------------------------------------------------------------------------


def _report(message: dict[str, Any]) -> None:
    """Tell the daemon how the start went, then let go of stdout (the daemon may go away)."""
    with contextlib.suppress(OSError):
        os.write(1, _json_line(message))
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[1] == "--idle":
        # a pre-started shim (the daemon keeps a few ready): everything is imported, and the
        # job directory arrives on stdin when a job starts; EOF means no job is coming
        load_serving_modules()
        line = sys.stdin.readline().strip()
        if not line:
            return 0
        args = [line]
    if len(args) != 1:
        print("usage: python -m flynn_host.shim JOBDIR | JOBS_DIR --idle", file=sys.stderr)
        return 2
    job_dir = os.path.abspath(args[0])
    # tracebacks go to the job directory, where the daemon's operator can find them
    with contextlib.suppress(OSError):
        err = os.open(os.path.join(job_dir, "shim.err"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                      0o600)  # fmt: skip
        os.dup2(err, 2)
        os.close(err)
    os.chdir("/")  # do not keep whatever directory the daemon ran in busy
    try:
        config = ShimConfig.load(os.path.join(job_dir, "shim.json"))
        set_subreaper()
        write_atomic(os.path.join(job_dir, "shim.pid"), f"{os.getpid()}\n".encode(), mode=0o600)
        shim = Shim(job_dir, config)
        pid = shim.start()
    except StartError as e:
        _report({"error": str(e)})
        return 1
    except Exception as e:
        import traceback

        traceback.print_exc()
        _report({"error": f"shim: {e}"})
        return 1
    _report({"pid": pid})
    load_serving_modules()
    return asyncio.run(shim.serve())


if __name__ == "__main__":
    sys.exit(main())

"""The shim's start-up: `shim.json` (`ShimConfig`, the one schema of the file the daemon writes
and the shim reads) and starting the container. `Container.start()` makes the shim the log's
writer and the attach socket's owner, runs `runc run --detach` with the shim's pipes (or a pty)
as the container's stdio, and returns init's pid; a failed start leaves nothing behind. This
runs on every job start, before the pid is reported, so it is stdlib only (asyncio and the
rest of serving are imported after the report); the small helpers that serving and the
daemon's client share live here for the same reason. Every file it makes is root's alone
(0600): the log shows what the job prints, secrets included.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import termios
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flynn_host.runtime.logs import LogWriter

PR_SET_CHILD_SUBREAPER = 36
RUNC_TIMEOUT = 60.0  # runc run --detach takes well under a second; a hang must not block forever
READ_SIZE = 64 * 1024
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


@dataclass
class ShimConfig:
    """`shim.json`: written by the daemon (`save`), read by the shim (`load`)."""

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

    def save(self, path: str) -> None:
        """Write a new `path`, root's alone from the moment it exists (a job directory's files
        are the daemon's private business)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
            json.dump(dataclasses.asdict(self), f)


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


def read_available(fd: int, limit: int = 1024 * 1024) -> bytes:
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


def json_line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# --- the container ------------------------------------------------------------------------


class Container:
    """One job's container as the shim starts it. After `start()` it holds what serving takes
    over: init's `pid`, the `log` writer, the listening attach socket, and the shim's ends of
    the container's stdio (`outputs` and `stdin_fd`, or the pty `master`)."""

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

    def path(self, name: str) -> str:
        return os.path.join(self.job_dir, name)

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
                raise StartError(self._runc_error(returncode, read_available(err_r)))
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

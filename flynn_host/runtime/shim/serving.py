"""The shim's serving, from the moment the container's pid is reported until its init has
exited: it pumps the container's output into the log (`logs.LogWriter`) and to attached
clients, reaps init (the shim is a child subreaper), and serves `JOBDIR/attach.sock`, where
each client sends one JSON request line (`attach`, `follow_logs`, `wait`, `signal` or
`status`). On init's exit it drains the output, writes `JOBDIR/exit.json` atomically, tells its
clients and returns; the daemon removes the container with `runc delete` after reading its
cgroup. The shim imports this module (and asyncio with it, ~35 ms) only after the report, so
none of it is on a job's start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from typing import Any

from flynn_host.atomicfile import write_atomic
from flynn_host.runtime import attach
from flynn_host.runtime.logs import encode_entry, format_entry, read_entries
from flynn_host.runtime.shim.startup import (
    READ_SIZE,
    Container,
    json_line,
    read_available,
    set_tty_size,
)
from flynn_host.runtime.shim.subscriber import (
    Subscriber,
    discard_until_eof,
    watch_hangup,
    write_all,
)

DRAIN_TIMEOUT = 2.0  # grandchildren may keep the output pipes open after init exits
CLIENT_LINGER = 2.0  # how long an attach client may take to close after its exit frame
CLIENT_FLUSH_TIMEOUT = 5.0  # how long clients get to take the last output before the shim exits
RUNC_KILL_TIMEOUT = 10.0  # `runc kill --all` freezes, signals and thaws: well under a second

STREAM_NUMBERS = {"stdout": 1, "stderr": 2}  # attach.STDOUT, attach.STDERR
# signals that go to every process of the container (`runc kill --all`), not to tini
EVERY_PROCESS_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGCONT})


def serve(container: Container) -> int:
    """Serve a started container until it has exited (the shim's exit status)."""
    return asyncio.run(Shim(container).serve())


def exit_info(wait_status: int) -> dict[str, int | None]:
    """`{"status", "signal"}` from a waitpid status; a signal death is status 128+signal."""
    code = os.waitstatus_to_exitcode(wait_status)
    if code < 0:
        return {"status": 128 - code, "signal": -code}
    return {"status": code, "signal": None}


# --- the shim -----------------------------------------------------------------------------


class Shim:
    """One job's started container, served by `serve()` until it has exited."""

    def __init__(self, container: Container) -> None:
        assert container.log is not None and container.server_sock is not None
        self.job_dir = container.job_dir
        self.config = container.config
        self.pid = container.pid
        self.log = container.log
        self.server_sock = container.server_sock
        self.outputs = container.outputs  # fd -> stream name, until each reaches EOF
        self.stdin_fd = container.stdin_fd
        self.master = container.master  # pty master, tty jobs only
        self.stdin: asyncio.StreamWriter | None = None  # writes to the stdin pipe or the pty
        self.exit: dict[str, int | None] | None = None  # {"status", "signal"} once init exited
        self.exited = asyncio.Event()  # init has exited
        self.outputs_done = asyncio.Event()  # every output reached EOF
        self.finished = asyncio.Event()  # output drained, log closed, exit.json written
        self.watchers: list[tuple[Subscriber, frozenset[str]]] = []
        self.followers: list[tuple[Subscriber, int]] = []
        self.clients: set[asyncio.Task[Any]] = set()
        # our own short-lived children (`runc kill`): the reaper hands them their wait status
        self.helpers: dict[int, asyncio.Future[int]] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.job_dir, name)

    # --- run ------------------------------------------------------------------------------

    async def serve(self) -> int:
        """Run until the container has exited and its exit has been recorded and announced."""
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
        write_atomic(self.path("exit.json"), json_line(self.exit), mode=0o600)
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
            data = read_available(fd) if final else os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO from a pty master once every slave is closed: the end of output
        if data:
            frame = attach.data_frame(STREAM_NUMBERS[stream], data)
            for sub, streams in list(self.watchers):
                if stream in streams:
                    sub.send(frame)
            self.log.write(stream, data)
        if not data or final:
            asyncio.get_running_loop().remove_reader(fd)
            del self.outputs[fd]
            if fd != self.master:
                os.close(fd)
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
            writer.write(json_line({"error": f"invalid request: {e}"}))
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
                writer.write(json_line({"exit": self.exit}))
            elif kind == "signal":
                writer.write(json_line(await self._signal(arg)))
            elif kind == "status":
                writer.write(json_line({"pid": self.pid, "running": not self.exited.is_set()}))
            else:
                raise ValueError(f"unknown request {kind!r}")
        except (ValueError, TypeError, KeyError) as e:
            writer.write(json_line({"error": f"invalid {kind} request: {e}"}))
        await writer.drain()

    async def _signal(self, sig: Any) -> dict[str, Any]:
        """Signal the job: through tini (PID 1), which passes it to the job's process group,
        except SIGSTOP and SIGCONT. tini cannot pass on a SIGSTOP (it would only stop tini
        itself), and a SIGCONT must resume every process the SIGSTOP stopped, so those two go
        to every process of the container (`runc kill --all`). SIGKILL needs no help: when
        PID 1 of a pid namespace dies, the kernel kills every other process in it."""
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
            stderr = read_available(err_r)
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
        # reading the files and subscribing happen without a yield in between: no gap
        entries = read_entries(self.config.log_file, since=since)
        sub = Subscriber(writer)
        entry = (sub, since)
        self.followers.append(entry)
        hangup = asyncio.create_task(watch_hangup(reader, sub))
        try:
            await write_all(writer, map(encode_entry, entries))
            await sub.release()
            if not await sub.wait_for(self.finished):
                return
        finally:
            self.followers.remove(entry)
            hangup.cancel()
        writer.write(json_line({"exit": self.exit}))

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
            await write_all(
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
            await asyncio.wait_for(discard_until_eof(reader), CLIENT_LINGER)

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


async def _pipe_writer(fd: int) -> asyncio.StreamWriter:
    """An asyncio writer for the container's stdin (a pipe, or a dup of the pty master)."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.streams.FlowControlMixin(loop=loop), os.fdopen(fd, "wb", buffering=0)
    )
    return asyncio.StreamWriter(transport, protocol, None, loop)

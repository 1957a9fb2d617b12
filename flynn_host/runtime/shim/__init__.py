"""The per-job shim: one process per job that owns its container (stdio, log, exit record,
attach socket) and so outlives restarts of the daemon. The daemon writes `JOBDIR/shim.json`
and runs `python -m flynn_host.runtime.shim JOBDIR` (`__main__`) in a new session; `startup` (stdlib
only, on every job's start) starts the container with `runc run --detach` and the shim reports
its pid; `serving` (asyncio, imported after the report) then logs its output and serves
`JOBDIR/attach.sock` until it exits, with `subscriber` for clients that follow the output;
`client` is what the daemon uses: requests to a shim's socket and the pool of pre-started
idle shims. This package imports nothing itself, so running the shim costs only what it needs.
"""

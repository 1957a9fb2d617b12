"""`flynn-host daemon`: parse Flynn's flags (after the host config file's `args`), set up
logging, build the plugin manager and run the host until a signal stops it."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from flynn_host.cli.usage import Parser
from flynn_host.client import HOST_KEY_ENV
from flynn_host.config import (
    DAEMON_USAGE,
    HostConfig,
    check_host_key,
    flag_defaults,
    load_config_file,
    parse_tags,
)
from flynn_host.runtime.images import images_dir


def parse_daemon_args(argv: list[str]) -> HostConfig:
    file_conf = load_config_file()
    for key, value in (file_conf.get("env") or {}).items():
        os.environ.setdefault(str(key), str(value))
    # every default is HostConfig's (written there only); those built by a factory are
    # filled in below: the hostname's id, no tags, no peers
    d = flag_defaults()
    p = Parser(DAEMON_USAGE)
    p.add_argument("--http-port", type=int, default=d["http_port"])
    p.add_argument("--external-ip", default=d["external_ip"])
    p.add_argument("--listen-ip", default=d["listen_ip"])
    p.add_argument("--state", default=d["state"])
    p.add_argument("--id", default=None)
    p.add_argument("--tags", default="")
    p.add_argument("--force", action="store_true", default=d["force"])
    p.add_argument("--volpath", default=d["volpath"])
    p.add_argument("--work-dir", default=d["work_dir"])
    p.add_argument("--run-dir", default=d["run_dir"])
    p.add_argument("--log-dir", default=d["log_dir"])
    p.add_argument("--log-file", default=d["log_file"])
    p.add_argument("--bridge-name", default=d["bridge_name"])
    p.add_argument("--discovery", default=d["discovery"])
    p.add_argument("--peer-ips", default="")
    p.add_argument("--max-job-concurrency", type=int, default=d["max_job_concurrency"])
    p.add_argument("--stop-timeout", type=float, default=d["stop_timeout"])
    p.add_argument("--log-max-bytes", type=int, default=d["log_max_bytes"])
    p.add_argument("--shim-pool", type=int, default=d["shim_pool"])
    p.add_argument("--disable-plugin", action="append", default=[])
    p.add_argument("--component", action="append", default=[])
    p.add_argument("--image-dir", action="append", default=[])
    # the config file's args come first so the command line overrides them
    args = p.parse([str(a) for a in file_conf.get("args") or []] + argv)

    plugins = file_conf.get("plugins") or {}
    disabled = list(plugins.get("disable") or [])
    for item in args.disable_plugin:
        disabled += [n.strip() for n in item.split(",") if n.strip()]
    components = dict(plugins.get("components") or {})
    for item in args.component:
        kind, sep, name = item.partition("=")
        if not sep or not kind or not name:
            raise ValueError(f"--component {item!r}: expected KIND=NAME")
        components[kind] = name
    if args.max_job_concurrency < 1:
        raise ValueError("--max-job-concurrency must be at least 1")
    extra = {}
    if args.id:
        extra["id"] = args.id
    if os.environ.get(HOST_KEY_ENV):
        host_key = check_host_key(os.environ[HOST_KEY_ENV], HOST_KEY_ENV)
    elif file_conf.get("host_key") is not None:
        host_key = check_host_key(file_conf["host_key"], "host config 'host_key'")
    else:
        raise ValueError(
            "no host key: run `flynn-host init` (it writes one into /etc/flynn/host.json; "
            f"give every host of a cluster the same, with --host-key) or set {HOST_KEY_ENV}"
        )
    return HostConfig(
        http_port=args.http_port,
        external_ip=args.external_ip,
        listen_ip=args.listen_ip,
        state=Path(args.state),
        volpath=Path(args.volpath),
        work_dir=Path(args.work_dir),
        run_dir=Path(args.run_dir),
        log_dir=Path(args.log_dir),
        log_file=Path(args.log_file) if args.log_file else None,
        bridge_name=args.bridge_name,
        force=args.force,
        max_job_concurrency=args.max_job_concurrency,
        stop_timeout=args.stop_timeout,
        log_max_bytes=args.log_max_bytes,
        shim_pool=max(0, args.shim_pool),
        tags=parse_tags(args.tags),
        disabled_plugins=disabled,
        components=components,
        discovery=args.discovery,
        peer_ips=[ip.strip() for ip in args.peer_ips.split(",") if ip.strip()],
        host_key=host_key,
        image_dirs=[images_dir(), *(Path(d).absolute() for d in args.image_dir)],
        **extra,
    )


def cmd_daemon(argv: list[str]) -> int:
    config = parse_daemon_args(argv)
    if os.geteuid() != 0:
        print("flynn-host daemon: must run as root (it mounts filesystems and runs runc)",
              file=sys.stderr)  # fmt: skip
        return 1
    handler: logging.Handler
    if config.log_file:
        config.log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(config.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])

    from pluggy import PluginValidationError

    from flynn_host.daemon import Host, exclusive_state
    from flynn_host.plugins.manager import PluginError, make_plugin_manager

    try:
        with exclusive_state(config):
            pm = make_plugin_manager(config.disabled_plugins)
            host = Host(config, pm)
            return asyncio.run(host.serve())
    except (PluginError, PluginValidationError, RuntimeError, ValueError, OSError) as exc:
        # a configuration the daemon cannot start with: say why, in its log and to the operator
        logging.getLogger("flynn_host").error("cannot start: %s", exc)
        print(f"flynn-host daemon: {exc}", file=sys.stderr)
        return 1

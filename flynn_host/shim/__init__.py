"""The per-job shim (being split into modules: everything is still in `serving`)."""

from flynn_host.shim.serving import ShimConfig, connect_shim, main, shim_request

__all__ = ["ShimConfig", "connect_shim", "main", "shim_request"]

"""The built-in bootstrap actions, offered through the same hook as a vendor's."""

from __future__ import annotations

from flynn_host.plugins.hookspecs import hookimpl


@hookimpl
def flynn_host_bootstrap_actions() -> dict[str, type]:
    from flynn_host.bootstrap import actions, genrandom, gentlscert, log, runapp, wait

    return {
        "gen-random": genrandom.GenRandom,
        "gen-tls-cert": gentlscert.GenTLSCert,
        "image-uri": actions.ImageURI,
        "log": log.Log,
        "wait": wait.Wait,
        "status-check": wait.StatusCheck,
        "require-env": actions.RequireEnv,
        "resource-check": actions.ResourceCheck,
        "run-app": runapp.RunApp,
        "wait-hosts": actions.WaitHosts,
    }

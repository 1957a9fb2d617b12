"""`flynn-host bootstrap`: run a Flynn bootstrap manifest against the cluster's hosts.

A manifest is a list of steps, each naming an action (`require-env`, `resource-check`,
`run-app`, `wait-hosts`, ...). Actions come from plugins through the
`flynn_host_bootstrap_actions` hook, the built-in ones included (`flynn_host.plugins.
bootstrap_actions`), so later components add their own. The pieces:

- `template` renders the manifest's Go-template subset, `manifest` finds, renders and parses it;
- `runner` holds the cluster state the actions share, the `Action` base class and the step loop;
- `actions` and `runapp` implement the built-in Layer 0 actions; `output` prints step events
  as Flynn does.
"""

from flynn_host.bootstrap.runner import (
    Action,
    ClusterHost,
    State,
    StepError,
    StepInfo,
    run_steps,
    wait_for_hosts,
)

__all__ = ["Action", "ClusterHost", "State", "StepError", "StepInfo", "run_steps", "wait_for_hosts"]

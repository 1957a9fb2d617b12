"""The controller: Flynn's REST API (apps, releases, artifacts, formations, providers,
resources, routes, events) on PostgreSQL, run as `flynn-host component controller`."""

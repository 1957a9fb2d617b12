"""flynn-tmpfs-volumes: a flynn-host plugin whose data volumes are tmpfs mounts.

`plugin` holds the hook implementations (the `flynn.plugins` entry point names it);
`volumes` the provider itself. Only `flynn_host.errors` and `flynn_host.plugins.hookspecs` are
imported from the host: a plugin depends on the host's public surface, nothing else.
"""

__version__ = "0.3.0"

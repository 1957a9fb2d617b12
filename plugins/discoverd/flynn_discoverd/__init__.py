"""discoverd: service discovery on etcd — Flynn's discoverd API and DNS (issue 4)."""

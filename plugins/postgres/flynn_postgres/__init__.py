"""postgres: the PostgreSQL appliance — PostgreSQL 15 nodes managed by Patroni on the cluster's
etcd (issue 11)."""

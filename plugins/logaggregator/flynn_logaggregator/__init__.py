"""logaggregator: the cluster's log service (docs/logaggregator.md)."""

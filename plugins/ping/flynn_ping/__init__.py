"""ping: the smallest platform component — serves `/.well-known/status` from inside a job."""

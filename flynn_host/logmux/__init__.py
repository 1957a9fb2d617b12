"""The host's log mux: every line each app job prints, shipped to every log aggregator.

The `flynn_host_job_log` hook hands each line to the `Sequencer` (sequencer.py), which gives it
a place in one host-wide order, its cursor position `(time, seq)`, and keeps the newest lines
encoded in memory (the ring) and where every line came from (the index: host seq -> job log
file, job seq). One `Shipper` per aggregator instance (shipper.py) asks the aggregator for this
host's cursor and sends everything after it: from the ring while the ring still holds it, else
read back from the job log files (`flynn_host.runtime.logs.LogReader`). `LogMux` (service.py)
follows the discoverd service `logaggregator` (and a static list of addresses), runs the
shippers, and keeps the sequence across a daemon restart. docs/logmux.md describes the whole.
"""

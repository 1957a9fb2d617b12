"""Job networking: the host's bridge and veths (`links`) and each job's namespace and address
(`jobnet`)."""

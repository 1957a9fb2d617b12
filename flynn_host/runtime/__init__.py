"""The container runtime: the runc backend, its per-job shim, bundles, layers, images, volumes,
attach and logs."""

"""Reads a Cloud Foundry style Staticfile (`key: value` lines) and prints the settings the
static buildpack knows as shell assignments (root, pushstate, directory, host_dot_files), then
one `ignored+=(key)` per key it does not: `staticfile.py Staticfile`."""

import shlex
import sys

KNOWN = {"root", "pushstate", "directory", "host_dot_files"}

settings = {}
ignored = []
with open(sys.argv[1], errors="replace") as f:
    for raw in f:
        line = raw.split("#", 1)[0].strip()
        if not line or ":" not in line:
            continue
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip().strip("'\"")
        if key in KNOWN:
            settings[key] = value
        else:
            ignored.append(key)
for key, value in settings.items():
    print(f"{key}={shlex.quote(value)}")
for key in ignored:
    print(f"ignored+=({shlex.quote(key)})")

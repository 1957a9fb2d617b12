"""flynn-host: the host daemon of Flynn, rebuilt in Python (see DESIGN.md in the project docs)."""

__version__ = "0.1.0"

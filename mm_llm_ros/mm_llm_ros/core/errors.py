"""The errors that stop start-up with one clear message: one type per concern, shared by every model.

    StartupError
    ├── ConfigError       a parameter value that cannot work (a preset, an override, a mode this build lacks)
    ├── CheckpointError   a weights file or directory that is missing, unreadable, unsafe or does not fit
    ├── DeviceError       a device or dtype that this machine cannot honour
    └── DependencyError   a package that a chosen feature needs is not installed

A node catches `StartupError` once and logs its message; an offline tool (`evaluate`, the benches) does the same.
Errors about one message or one request (decoding, preprocessing, generation) are not start-up errors: they are
ValueErrors of their own modules, counted and answered, and never stop a node.
"""
from __future__ import annotations


class StartupError(Exception):
    """A problem the user must fix before the node (or tool) can start; the message says what and where."""


class ConfigError(StartupError, ValueError):
    """A parameter value that cannot work: unknown choice, out of range, or not supported by this build."""


class CheckpointError(StartupError, ValueError):
    """A weights file or directory that is missing, unreadable, unsafe (would run code) or does not fit the model."""


class DeviceError(StartupError, ValueError):
    """A device or dtype setting that cannot be honoured on this machine."""


class DependencyError(StartupError, ImportError):
    """A package needed by a chosen feature is not installed; the message says how to install it."""

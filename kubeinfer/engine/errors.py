"""Every exception the engine raises on purpose, in one place.

- `ConfigError`: a setting a user chose cannot work (start-up; the CLI prints it without a trace).
- `RequestError`: a request the engine cannot take (the server answers 400 with its words).
- `RequestFailedError`: the engine failed while working on one request; that request ends, the
  engine goes on (the server answers 500 without the internal text, which is only logged).
- `EngineDeadError`: the engine loop stopped; nothing more can be served (the process exits so
  Kubernetes restarts the pod).
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A setting a user chose cannot work. The message says which and what to change."""


class RequestError(ValueError):
    """A request the engine cannot take, e.g. a prompt longer than the model allows. `param` names
    the request field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class RequestFailedError(RuntimeError):
    """The engine failed on this request (not the client's fault); the message is safe to show."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; requests in flight end with it."""

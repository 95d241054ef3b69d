"""Errors that point the user at the exact place in their input."""

from __future__ import annotations


class KvsimError(Exception):
    """Base class: every error kvsim raises on bad user input."""


class TraceError(KvsimError, ValueError):
    """A malformed trace line: names the file, the 1-based line and the field."""

    def __init__(self, path: str, line: int, field: str, reason: str, code: str = "invalid"):
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        #: short machine-readable reason, used to count rejected lines in the summary
        self.code = code
        super().__init__(f"{self.path}:{line}: field '{field}': {reason}")


class ConfigError(KvsimError, ValueError):
    """A bad option value or unknown option; names the source (file or flag), key and value."""


class UnknownNameError(KvsimError, ValueError):
    """An unknown model, hardware or method name; the message lists the known ones."""

    def __init__(self, kind: str, name: str, known, hint: str = ""):
        self.kind, self.name = kind, name
        self.known = sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {', '.join(self.known)}" + (f"; {hint}" if hint else ""))

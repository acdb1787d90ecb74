"""API errors as the Kubernetes API server reports them: a `Status` object with code and reason."""
from __future__ import annotations

from typing import Any


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body

    # ---- the reasons the emulator uses ----
    @classmethod
    def not_found(cls, plural: str, name: str, group: str = "") -> "ApiError":
        what = f"{plural}.{group}" if group else plural
        return cls(404, "NotFound", f'{what} "{name}" not found', {"name": name, "group": group, "kind": plural})

    @classmethod
    def no_route(cls) -> "ApiError":
        return cls(404, "NotFound", "the server could not find the requested resource", {})

    @classmethod
    def already_exists(cls, plural: str, name: str, group: str = "") -> "ApiError":
        what = f"{plural}.{group}" if group else plural
        return cls(409, "AlreadyExists", f'{what} "{name}" already exists',
                   {"name": name, "group": group, "kind": plural})

    @classmethod
    def conflict(cls, plural: str, name: str, why: str, group: str = "") -> "ApiError":
        what = f"{plural}.{group}" if group else plural
        return cls(409, "Conflict", f'Operation cannot be fulfilled on {what} "{name}": {why}',
                   {"name": name, "group": group, "kind": plural})

    @classmethod
    def invalid(cls, kind: str, name: str, causes: list[tuple[str, str]], group: str = "") -> "ApiError":
        """`causes` are (field, message) pairs, e.g. ("spec.replicas", "Invalid value: -1: must be >= 0")."""
        text = "; ".join(f"{field}: {msg}" if field else msg for field, msg in causes)
        if len(causes) > 1:
            text = f"[{', '.join(f'{f}: {m}' if f else m for f, m in causes)}]"
        return cls(422, "Invalid", f'{kind}{"." + group if group else ""} "{name}" is invalid: {text}',
                   {"name": name, "group": group, "kind": kind,
                    "causes": [{"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in causes]})

    @classmethod
    def bad_request(cls, message: str) -> "ApiError":
        return cls(400, "BadRequest", message)

    @classmethod
    def unprocessable(cls, message: str) -> "ApiError":
        return cls(422, "Invalid", message)

    @classmethod
    def gone(cls, message: str) -> "ApiError":
        return cls(410, "Expired", message)

    @classmethod
    def unsupported_media_type(cls, content_type: str) -> "ApiError":
        return cls(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                   f"accepted media types include: application/json-patch+json, application/merge-patch+json, "
                   f"application/apply-patch+yaml (got {content_type!r})")

    @classmethod
    def forbidden(cls, plural: str, name: str, message: str) -> "ApiError":
        return cls(403, "Forbidden", f'{plural} "{name}" is forbidden: {message}', {"name": name, "kind": plural})

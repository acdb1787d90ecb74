"""`StructuredOutputsParams`: what one request constrains its output to, validated on construction.

Exactly one of `json`, `regex`, `choice`, `grammar`, `json_object`, `structural_tag` is set (vLLM's
`structured_outputs` field, with vLLM's names). The dataclass is frozen and its `key()` is hashable,
so compiled grammars can be cached by it. Validation here is shape only (types, emptiness, JSON
syntax); whether a schema, regex or grammar compiles is the compiler's question
(`compiler.StructuredOutputCompiler`), which answers with the same kind of `RequestError`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubeinfer.engine.errors import RequestError

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

# Small models sampled at temperature 1 fall into runs of whitespace inside JSON until max_tokens when
# any whitespace is allowed; bounding each run keeps them moving. 16 characters still allows a
# newline and pretty-printed indentation seven levels deep (2 spaces each).
DEFAULT_MAX_WHITESPACE_RUN = 16


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One request's output constraint.

    json: a JSON schema (a dict, or its JSON text). regex: a regular expression the whole output
    matches. choice: the output is exactly one of these strings. grammar: an EBNF/GBNF grammar
    (rule `root`), or a Lark grammar (rule `start`), which is converted. json_object: any JSON
    object. structural_tag: xgrammar's structural tag as JSON text (vLLM's `structures`/`triggers`
    shape, or xgrammar's `format` shape).

    disable_any_whitespace: JSON without any whitespace between tokens (vLLM's option). Otherwise
    whitespace runs are bounded to `max_whitespace_run` characters (None: unbounded).
    `param` is the request field the constraint came from, named in errors.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    max_whitespace_run: int | None = DEFAULT_MAX_WHITESPACE_RUN
    param: str = "structured_outputs"

    def __post_init__(self) -> None:
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            what = "none" if not set_kinds else ", ".join(set_kinds)
            raise RequestError(f"{self.param} must set exactly one of {', '.join(KINDS)}; got {what}",
                               self.param)
        if self.json is not None:
            object.__setattr__(self, "json", self._canonical_json(self.json))
        if self.regex is not None:
            self._check_text("regex", self.regex)
        if self.grammar is not None:
            self._check_text("grammar", self.grammar)
        if self.structural_tag is not None:
            tag = self.structural_tag
            if isinstance(tag, dict):
                tag = json.dumps(tag, sort_keys=True)
            self._check_text("structural_tag", tag)
            try:
                json.loads(tag)
            except ValueError as e:
                raise RequestError(f"{self.param}.structural_tag is not valid JSON: {e}",
                                   self.param) from None
            object.__setattr__(self, "structural_tag", tag)
        if self.choice is not None:
            self._check_choice(self.choice)
        if not isinstance(self.json_object, bool):
            raise RequestError(f"{self.param}.json_object must be true or false", self.param)
        if self.max_whitespace_run is not None and (
                isinstance(self.max_whitespace_run, bool) or not isinstance(self.max_whitespace_run, int)
                or self.max_whitespace_run < 1):
            raise RequestError(f"{self.param}.max_whitespace_run must be a positive integer or null, "
                               f"got {self.max_whitespace_run!r}", self.param)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as text (schema JSON, regex, grammar, ...), the cache key's second half."""
        value = getattr(self, self.kind)
        if self.kind == "choice":
            return json.dumps(list(value), ensure_ascii=False)
        if self.kind == "json_object":
            return ""
        return value

    def key(self) -> tuple:
        """Hashable identity of the compiled grammar: (kind, spec, whitespace options)."""
        return (self.kind, self.spec, self.disable_any_whitespace, self.max_whitespace_run)

    def _check_text(self, name: str, value: Any) -> None:
        if not isinstance(value, str) or not value.strip():
            raise RequestError(f"{self.param}.{name} must be a non-empty string, got {value!r}",
                               self.param)

    def _check_choice(self, choice: Any) -> None:
        if isinstance(choice, str) or not isinstance(choice, (list, tuple)) or not choice:
            raise RequestError(f"{self.param}.choice must be a non-empty list of strings, got "
                               f"{choice!r}", self.param)
        bad = next((c for c in choice if not isinstance(c, str) or not c), None)
        if bad is not None or any(not isinstance(c, str) for c in choice):
            raise RequestError(f"{self.param}.choice must hold non-empty strings only; {bad!r} is "
                               "not one", self.param)
        object.__setattr__(self, "choice", tuple(choice))

    def _canonical_json(self, schema: Any) -> str:
        """The schema as JSON text with sorted keys, so equal schemas share one cache entry."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise RequestError(f"{self.param}.json is not valid JSON: {e}", self.param) from None
        if isinstance(schema, bool):
            # JSON Schema allows `true` (anything); xgrammar wants an object, so say it that way.
            schema = {} if schema else None
        if not isinstance(schema, dict):
            raise RequestError(f"{self.param}.json must be a JSON schema object, got "
                               f"{type(schema).__name__}", self.param)
        return json.dumps(schema, sort_keys=True, ensure_ascii=False)

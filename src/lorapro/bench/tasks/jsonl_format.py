"""Reading the ``jsonl:PATH`` task's files: one JSON object a line, checked line by line.

A line is ``{"prompt": ..., "response": ...}`` or ``{"messages": [..., {"role": "assistant",
"content": ...}]}``; other keys are ignored and blank lines skipped. Every bad line is
refused, naming the file and the line, before anything trains.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["JsonlFormatError", "JsonlRecord", "final_answer", "read_jsonl", "refuse_lines"]

_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "an array",
               dict: "an object", type(None): "null"}  # fmt: skip


class JsonlFormatError(ValueError):
    """A JSONL file cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class JsonlRecord:
    """One line: either a prompt and a response, or chat messages ending with the assistant's."""

    source: Path
    line: int
    prompt: str | None = None
    response: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def reference(self) -> str:
        """The response text: what the answer regex reads on the reference side."""
        if self.messages is not None:
            return self.messages[-1]["content"]
        assert self.response is not None
        return self.response


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _text_field(obj: dict[str, Any], name: str, where: str = "field") -> str:
    """The named field as a non-empty string, or a ValueError saying what is wrong with it."""
    if name not in obj:
        raise ValueError(f"missing {where} {name!r}")
    value = obj[name]
    if not isinstance(value, str):
        raise ValueError(f"{where} {name!r} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise ValueError(f"empty {where} {name!r}")
    return value


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        got = "an empty array" if value == [] else _json_type(value)
        raise ValueError(
            f"field 'messages' must be a non-empty array of {{role, content}} objects, got {got}"
        )
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(
                f"messages[{i}] must be an object with 'role' and 'content', got {_json_type(item)}"
            )
        where = f"messages[{i}] field"
        messages.append(
            {"role": _text_field(item, "role", where), "content": _text_field(item, "content", where)}
        )
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            "the last message must be the reply to learn (role 'assistant'), "
            f"got role {messages[-1]['role']!r}"
        )
    if len(messages) < 2:
        raise ValueError("'messages' needs at least one message before the assistant's reply")
    return tuple(messages)


def _record(source: Path, line: int, text: str) -> JsonlRecord:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{_json_type(obj)}, not an object with 'prompt' and 'response' (or 'messages')")
    has_pair = "prompt" in obj or "response" in obj
    if "messages" in obj and has_pair:
        raise ValueError("has both 'messages' and 'prompt'/'response'; give one of the two formats per line")
    if "messages" in obj:
        return JsonlRecord(source, line, messages=_messages(obj["messages"]))
    if not has_pair:
        raise ValueError("missing fields 'prompt' and 'response' (or 'messages')")
    return JsonlRecord(source, line, prompt=_text_field(obj, "prompt"), response=_text_field(obj, "response"))


def refuse_lines(errors: Sequence[str]) -> None:
    """Raise JsonlFormatError with the first of ``errors`` (file:line: reason) and how many more
    there are; nothing when there are none."""
    if errors:
        more = (
            f" (and {len(errors) - 1} more bad line{'s' if len(errors) > 2 else ''})"
            if len(errors) > 1
            else ""
        )
        raise JsonlFormatError(errors[0] + more)


def read_jsonl(path: str | Path) -> list[JsonlRecord]:
    """Every record of the file; raises JsonlFormatError naming the first bad line (and how many more)."""
    path = Path(path)
    if not path.is_file():
        raise JsonlFormatError(
            f"{path}: no such file; pass jsonl:PATH with a JSONL file (one JSON object a line)"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise JsonlFormatError(
            f"{path}:{line}: not UTF-8 text ({exc.reason}); save the file as UTF-8"
        ) from None
    records: list[JsonlRecord] = []
    errors: list[str] = []
    # Lines end at \n only: JSON strings cannot hold a raw newline, but may hold other line
    # separators (U+2028) that str.splitlines would split on.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(_record(path, number, line))
        except ValueError as exc:
            errors.append(f"{path}:{number}: {exc}")
    refuse_lines(errors)
    if not records:
        raise JsonlFormatError(
            f"{path}: no JSON lines; write one object with 'prompt' and 'response' per line"
        )
    return records


def final_answer(regex: re.Pattern[str], text: str) -> str | None:
    """The final answer in ``text``: the regex's first group (its whole match if it has no
    group) at the first match, stripped; None without a match."""
    found = regex.search(text)
    if found is None:
        return None
    answer = found.group(1) if regex.groups else found.group(0)
    return (answer or "").strip()

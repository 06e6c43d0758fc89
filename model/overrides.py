"""`key=value` overrides of any config field on the command line, as MaxText takes them.

    pathways train --config palm-tiny n_layers=4 dtype=bfloat16 optimizer.peak_learning_rate=5e-3 \\
        dropout_rate=0.1 batch_ramp=0:4,20:8

A value is read as the type of the field it replaces (int, float, bool, str); nested dataclasses
(the optimizer) are reached with dots; `batch_ramp` takes `STEP:SEQUENCES` pairs separated by
commas (empty for none). The result is validated like any config.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Sequence
from typing import Any

from model.config import PalmConfig

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def is_override(text: str) -> bool:
    """True for `name=value` words (the form positional overrides take)."""
    name, sep, _ = text.partition("=")
    return bool(sep) and name.replace(".", "").replace("_", "").isalnum()


def _ramp(text: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    for part in filter(None, text.replace(" ", "").split(",")):
        step, sep, size = part.partition(":")
        if not sep:
            raise ValueError(f"batch_ramp takes STEP:SEQUENCES pairs like 0:4,20:8, got {text!r}")
        pairs.append((int(step), int(size)))
    return tuple(pairs)


def _convert(field: str, current: Any, text: str) -> Any:
    if field == "batch_ramp":
        return _ramp(text)
    if isinstance(current, bool):
        if text.lower() not in _BOOLS:
            raise ValueError(f"{field} takes true or false, got {text!r}")
        return _BOOLS[text.lower()]
    if isinstance(current, int):
        return int(text.replace("_", ""))
    if isinstance(current, float):
        return float(text)
    if current is None or isinstance(current, (tuple, list)):
        return json.loads(text)
    return text


def _apply(obj: Any, path: Sequence[str], text: str, full: str) -> Any:
    names = [f.name for f in dataclasses.fields(obj)]
    head = path[0]
    if head not in names:
        close = difflib.get_close_matches(head, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; fields: {', '.join(names)}"
        raise ValueError(f"{full}: {type(obj).__name__} has no field {head!r}{hint}")
    current = getattr(obj, head)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"{full}: {head} is not a group of fields")
        value = _apply(current, path[1:], text, full)
    else:
        if dataclasses.is_dataclass(current):
            raise ValueError(f"{full}: set the fields of {head} one by one ({head}.NAME=VALUE)")
        try:
            value = _convert(head, current, text)
        except (ValueError, json.JSONDecodeError) as err:
            raise ValueError(f"{full}: {err}") from None
    return dataclasses.replace(obj, **{head: value})


def apply_overrides(config: PalmConfig, overrides: Sequence[str]) -> PalmConfig:
    """`config` with each `name=value` (or `group.name=value`) applied in order.

    Raises ValueError naming the override for an unknown field, a malformed value, or a config the
    change makes invalid.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"overrides look like name=value, got {item!r}")
        try:
            config = _apply(config, key.split("."), text, item)
        except (TypeError, ValueError) as err:
            message = str(err)
            raise ValueError(message if message.startswith(item) else f"{item}: {message}") from None
    return config

"""Turning a nested config into MLflow params, tags and metrics that every MLflow server accepts.

MLflow params are flat string pairs with limits: keys of at most 250 characters from a fixed alphabet,
values of at most 500 characters on older servers (6000 on current ones; we keep the conservative
limit so a run logs the same way against any server; the full config is always logged as
`config.json` as well), and at most 100 params/tags or 1000 metrics per `log_batch` request.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

PARAM_VALUE_LIMIT = 500
TAG_VALUE_LIMIT = 5000
KEY_LIMIT = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
TRUNCATION_MARK = "...[truncated]"

# MLflow accepts letters, digits, `_`, `-`, `.`, ` `, `/` and `:` in keys (mlflow.utils.validation).
_BAD_KEY_CHARS = re.compile(r"[^\w.\- /:]")


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts, enums -> values, paths -> str, tuples -> lists, recursively.

    Used both for params and for the JSON config artifact, so both show the same values.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [to_plain(v) for v in items]
    if isinstance(value, enum.Enum):
        return to_plain(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return value.item()  # numpy / torch scalars, without importing either
    return value


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings (and dataclasses) into dotted keys: {"model": {"width": 8}} -> {"model.width": 8}.

    Lists stay whole (they become one JSON param): a bucket list or a prompt list is one setting, and
    exploding it into `buckets.0`, `buckets.1`, ... makes runs with different lengths incomparable.
    An empty mapping becomes the value `{}` so that its presence is still recorded.
    """
    plain = to_plain(config)
    if not isinstance(plain, dict):
        raise TypeError(
            f"config must be a mapping or a dataclass, got {type(config).__name__}; "
            "pass the resolved config as a dict"
        )
    flat: dict[str, Any] = {}
    for key, value in plain.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, full))
        else:
            flat[full] = value
    return flat


def format_value(value: Any) -> str:
    """One param/tag value as a string: JSON for containers, plain str otherwise."""
    value = to_plain(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def truncate(text: str, limit: int) -> str:
    """Cut `text` to `limit` characters, marking the cut so nobody mistakes it for the real value."""
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def sanitize_key(key: str) -> str:
    """Make `key` a valid MLflow key: bad characters -> `_`; over-long keys cut with a hash suffix.

    The hash keeps two long keys that share a prefix distinct after cutting.
    """
    clean = _BAD_KEY_CHARS.sub("_", str(key)).strip("/") or "_"
    # MLflow rejects path-like keys with `..` components and a leading `/`.
    clean = re.sub(r"\.{2,}", ".", clean)
    if len(clean) > KEY_LIMIT:
        digest = hashlib.sha1(clean.encode()).hexdigest()[:8]
        clean = clean[: KEY_LIMIT - 9] + "~" + digest
    return clean


def to_params(values: Mapping[str, Any], *, flatten: bool = True) -> dict[str, str]:
    """A (nested) mapping -> {valid key: value string of at most PARAM_VALUE_LIMIT characters}."""
    flat = flatten_config(values) if flatten else dict(values)
    return {sanitize_key(k): truncate(format_value(v), PARAM_VALUE_LIMIT) for k, v in flat.items()}


def to_tags(values: Mapping[str, Any]) -> dict[str, str]:
    """A flat mapping -> tags (tags allow longer values than params)."""
    return {sanitize_key(k): truncate(format_value(v), TAG_VALUE_LIMIT) for k, v in values.items()}


def to_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """A flat mapping of numbers (python, numpy or 0-d torch) -> {valid key: float}.

    Raises a TypeError naming the key when a value is not a number (e.g. a tensor with more than one
    element), so the bug shows at the call site instead of as a dropped metric later.
    """
    metrics: dict[str, float] = {}
    for key, value in values.items():
        try:
            number = float(to_plain(value))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"metric {key!r} has value {value!r} of type {type(value).__name__}, which is not a "
                "number; log a Python float (e.g. loss.item())"
            ) from err
        metrics[sanitize_key(key)] = number
    return metrics


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most `size` items (MLflow's per-request batch limits)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]

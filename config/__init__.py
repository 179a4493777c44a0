"""Configuration: TOML defaults shipped with the package, a site file, then environment overrides.

Installed as the ``cxr_config`` package. Precedence (last wins): the packaged ``<name>.toml``, the
file given with ``--config``, then environment variables ``<PREFIX>__SECTION__KEY=value`` (values
parsed as TOML scalars when they parse, else kept as strings), e.g.
``CXR_WORKER__NETWORK__PORT=11113`` or ``CXR_TRAIN__TRAIN__EPOCHS=5``.
"""

from __future__ import annotations

import copy
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Mapping


def packaged_defaults(name: str) -> dict[str, Any]:
    """The TOML file ``<name>.toml`` shipped beside this module, as a dict."""
    text = resources.files(__name__).joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def _parse_scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``; unknown keys are errors (typos matter)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if key not in merged:
            raise KeyError(f"unknown configuration key {key!r}")
        if isinstance(merged[key], dict):
            if not isinstance(value, Mapping):
                raise TypeError(f"configuration key {key!r} is a section, got {value!r}")
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def env_overrides(prefix: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Collect ``PREFIX__A__B=value`` variables into ``{"a": {"b": value}}``."""
    environ = os.environ if environ is None else environ
    result: dict[str, Any] = {}
    marker = f"{prefix}__"
    for name, raw in environ.items():
        if not name.startswith(marker):
            continue
        path = [part.lower() for part in name[len(marker):].split("__") if part]
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_scalar(raw)
    return result


def load(name: str, prefix: str, site_file: str | Path | None = None,
         environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Packaged defaults, then the site file, then the environment."""
    settings = packaged_defaults(name)
    if site_file is not None:
        with open(site_file, "rb") as handle:
            settings = merge(settings, tomllib.load(handle))
    return merge(settings, env_overrides(prefix, environ))

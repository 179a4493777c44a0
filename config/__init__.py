"""Configuration: TOML defaults shipped with the package, a site file, then environment overrides.

Installed as the ``cxr_config`` package. Precedence (last wins): the packaged ``<name>.toml``, the
file given with ``--config``, then environment variables ``<PREFIX>__SECTION__KEY=value`` (values
parsed as TOML values when they parse, else kept as strings; a value that starts like a TOML array
or table, ``[`` or ``{``, must parse), e.g. ``CXR_WORKER__NETWORK__PORT=11113`` or
``CXR_TRAIN__TRAIN__EPOCHS=5``.

Every problem is a ``ConfigError`` whose message names the key as ``section.key``, where it came from
(the file, or the environment variable) and, for a file, the environment variable of the same key.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """The configuration cannot be read or merged; the message names the key and its source."""


def packaged_defaults(name: str) -> dict[str, Any]:
    """The TOML file ``<name>.toml`` shipped beside this module, as a dict."""
    text = resources.files(__name__).joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def env_name(prefix: str, dotted: str) -> str:
    """The environment variable of a key: ``env_name("CXR_WORKER", "network.port")`` ->
    ``CXR_WORKER__NETWORK__PORT``."""
    return "__".join([prefix, *(part.upper() for part in dotted.split("."))])


def _parse_scalar(text: str, variable: str = "") -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if text.lstrip()[:1] in ("[", "{"):  # meant as a TOML array / inline table: say why it is not one
            # the column in the value itself, not in the "v = " line it was parsed in
            why = re.sub(r"\(at line 1, column (\d+)\)", lambda m: f"(at column {max(1, int(m[1]) - 4)})", str(exc))
            raise ConfigError(f"{variable or 'value'}: TOML syntax error in {text!r}: {why} (write TOML, e.g. "
                              "[{name = \"pacs\", host = \"10.0.0.5\", port = 104, ae_title = \"PACS\"}]; "
                              "JSON's \"key\": value is not TOML)") from None
        return text


def merge(base: Mapping[str, Any], override: Mapping[str, Any], *, source: str = "", prefix: str = "",
          _path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``; unknown keys are errors (typos matter).

    ``source`` (a file name, or "environment") and ``prefix`` (e.g. "CXR_WORKER") only make the
    messages name where a bad key came from and its environment variable.
    """
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        dotted = ".".join((*_path, key))
        if key not in merged:
            raise ConfigError(f"{dotted}: unknown key{_hint(key, merged)}{_where(source, prefix, dotted)}")
        if isinstance(merged[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted}: is a section ([{dotted}]), got {value!r}{_where(source, prefix, dotted)}")
            merged[key] = merge(merged[key], value, source=source, prefix=prefix, _path=(*_path, key))
        else:
            merged[key] = value
    return merged


def _hint(key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _where(source: str, prefix: str, dotted: str) -> str:
    variable = env_name(prefix, dotted) if prefix else ""
    if source == "environment":
        return f" (environment variable {variable})" if variable else " (environment)"
    parts = [f"in {source}" if source else "", f"as an environment variable: {variable}" if variable else ""]
    return f" ({'; '.join(p for p in parts if p)})" if any(parts) else ""


def env_overrides(prefix: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Collect ``PREFIX__A__B=value`` variables into ``{"a": {"b": value}}``."""
    environ = os.environ if environ is None else environ
    result: dict[str, Any] = {}
    marker = f"{prefix}__"
    for name, raw in environ.items():
        if not name.startswith(marker):
            continue
        path = [part.lower() for part in name[len(marker):].split("__") if part]
        if not path:
            continue
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {'.'.join(path[:-1])} is set both as a value and as a section")
        node[path[-1]] = _parse_scalar(raw, name)
    return result


def read_site_file(site_file: str | Path) -> dict[str, Any]:
    """A site TOML file as a dict; a missing file or a syntax error is a ConfigError naming the file
    (tomllib's message gives the line and column)."""
    try:
        with open(site_file, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {site_file} (--config): no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"configuration file {site_file} (--config): is a directory") from None
    except PermissionError:
        raise ConfigError(f"configuration file {site_file} (--config): permission denied") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration file {site_file}: not UTF-8 text ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {site_file}: TOML syntax error: {exc}") from None


def load(name: str, prefix: str, site_file: str | Path | None = None,
         environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Packaged defaults, then the site file, then the environment."""
    settings = packaged_defaults(name)
    if site_file is not None:
        settings = merge(settings, read_site_file(site_file), source=str(site_file), prefix=prefix)
    return merge(settings, env_overrides(prefix, environ), source="environment", prefix=prefix)

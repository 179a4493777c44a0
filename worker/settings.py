"""Typed worker settings, built from the merged TOML dict (config/worker.toml + site file + env).

Every value is validated when the dataclass is constructed, so a bad configuration stops the
worker at start-up with a message naming the key, never half-way through a study. The defaults
live only in config/worker.toml: the dataclasses have none, and the packaged file defines every
key (a missing one is a packaging error, reported as such). The one rule kept here is
``model.path = ""``, the shipped model (``DEFAULT_MODEL``).
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import cxr_config

from .errors import SettingsError

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "default.safetensors"
_AE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")


def _check_ae(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip() or "\\" in value:
        raise SettingsError(f"{key}: {value!r} is not a valid AE title (1-16 printable ASCII, no backslash)")
    return value.strip()


def _check_num(key: str, value: Any, *, minimum: float | None = None, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise SettingsError(f"{key}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if minimum is not None and value < minimum:
        raise SettingsError(f"{key}: must be >= {minimum}, got {value!r}")
    return value


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SettingsError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"{key}: expected true or false, got {value!r}")
    return value


def _check_str_list(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SettingsError(f"{key}: expected a list of strings, got {value!r}")
    return list(value)


def _check_file(key: str, value: Any, *, required: bool = False) -> str:
    """"" (when not required) or the path of an existing file, expanded."""
    if not isinstance(value, (str, Path)):
        raise SettingsError(f"{key}: expected a file path (string), got {value!r}")
    if not str(value):
        if required:
            raise SettingsError(f"{key}: required")
        return ""
    path = Path(value).expanduser()
    if not path.is_file():
        raise SettingsError(f"{key}: no such file: {path}")
    return str(path)


class DestinationKind:
    """``destinations[].kind``: how SRs reach the destination."""

    DIMSE = "dimse"          # C-STORE over a DICOM association (worker/net/scu.py)
    DICOMWEB = "dicomweb"    # STOW-RS over HTTP(S) (worker/net/dicomweb.py)
    ALL = (DIMSE, DICOMWEB)


class DestinationAuth:
    """``destinations[].auth``: HTTP authentication of a dicomweb destination."""

    NONE = "none"
    BEARER = "bearer"        # Authorization: Bearer <the value of the variable token_env>
    BASIC = "basic"          # username + the value of the variable password_env
    ALL = (NONE, BEARER, BASIC)


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Destination:
    """One ``[[destinations]]`` table. Its optional keys have their defaults here: a list entry has
    no packaged table to take them from (config/worker.toml documents them in its comment block)."""

    name: str
    kind: str = DestinationKind.DIMSE
    host: str = ""                   # dimse: required
    port: int = 0                    # dimse: required
    ae_title: str = ""               # dimse: required
    tls: bool = False                # DICOM TLS to this destination (worker/net/tls.py client_context)
    tls_ca_certificates: str = ""    # CA file that signed its certificate ("" = system CAs); dicomweb: https CAs
    tls_certificate: str = ""        # our client certificate, when it requires one ...
    tls_private_key: str = ""        # ... and its (unencrypted) private key
    storage_commitment: bool = False  # dimse: request Storage Commitment for every delivered SR
    commitment_timeout: float = 60.0  # seconds to wait for the N-EVENT-REPORT before requesting again
    url: str = ""                    # dicomweb: the STOW-RS base URL (POST {url}/studies)
    auth: str = DestinationAuth.NONE  # dicomweb: none | bearer | basic
    username: str = ""               # dicomweb, basic: the user name
    token_env: str = ""              # dicomweb, bearer: the environment variable holding the token
    password_env: str = ""           # dicomweb, basic: the environment variable holding the password

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SettingsError(f"destinations: name must be a non-empty string, got {self.name!r}")
        key = f"destinations.{self.name}"
        _check_choice(f"{key}.kind", self.kind, DestinationKind.ALL)
        if self.kind == DestinationKind.DIMSE:
            if not isinstance(self.host, str) or not self.host:
                raise SettingsError(f"{key}.host: must be a host name or address")
            _check_num(f"{key}.port", self.port, minimum=1, integer=True)
            if self.port > 65535:
                raise SettingsError(f"{key}.port: {self.port} > 65535")
            _check_ae(f"{key}.ae_title", self.ae_title)
            for other in ("url", "username", "token_env", "password_env"):
                if getattr(self, other):
                    raise SettingsError(f"{key}.{other}: only for kind = \"dicomweb\"")
            if self.auth != DestinationAuth.NONE:
                raise SettingsError(f"{key}.auth: only for kind = \"dicomweb\"")
        else:
            if not isinstance(self.url, str) or not re.match(r"^https?://[^/\s]+", self.url):
                raise SettingsError(f"{key}.url: expected an http:// or https:// base URL, got {self.url!r}")
            object.__setattr__(self, "url", self.url.rstrip("/"))
            if self.storage_commitment:
                raise SettingsError(f"{key}.storage_commitment: DICOM Storage Commitment needs kind = \"dimse\"")
            if self.host or self.port or self.ae_title:
                raise SettingsError(f"{key}: host, port and ae_title are for kind = \"dimse\"; "
                                    "a dicomweb destination has a url")
        _check_bool(f"{key}.tls", self.tls)
        _check_bool(f"{key}.storage_commitment", self.storage_commitment)
        _check_num(f"{key}.commitment_timeout", self.commitment_timeout, minimum=1)
        _check_choice(f"{key}.auth", self.auth, DestinationAuth.ALL)
        for env_key in ("token_env", "password_env"):
            value = getattr(self, env_key)
            if not isinstance(value, str) or (value and not _ENV_NAME_RE.match(value)):
                raise SettingsError(f"{key}.{env_key}: expected the name of an environment variable, got {value!r}")
        if not isinstance(self.username, str):
            raise SettingsError(f"{key}.username: expected a string, got {self.username!r}")
        if self.auth == DestinationAuth.BEARER and not self.token_env:
            raise SettingsError(f"{key}.token_env: auth = \"bearer\" needs the variable that holds the token")
        if self.auth == DestinationAuth.BASIC and not (self.username and self.password_env):
            raise SettingsError(f"{key}: auth = \"basic\" needs username and password_env")
        for tls_key in ("tls_ca_certificates", "tls_certificate", "tls_private_key"):
            object.__setattr__(self, tls_key, _check_file(f"{key}.{tls_key}", getattr(self, tls_key)))
        if bool(self.tls_certificate) != bool(self.tls_private_key):
            raise SettingsError(f"{key}: tls_certificate and tls_private_key go together")
        tls_on = self.tls if self.kind == DestinationKind.DIMSE else self.url.startswith("https://")
        if not tls_on and (self.tls_ca_certificates or self.tls_certificate):
            raise SettingsError(f"{key}: tls_* files given but " +
                                ("tls = false" if self.kind == DestinationKind.DIMSE else "the url is not https://"))
        if self.kind == DestinationKind.DICOMWEB and self.tls:
            raise SettingsError(f"{key}.tls: a dicomweb destination uses TLS when its url is https://")

    @property
    def is_dicomweb(self) -> bool:
        return self.kind == DestinationKind.DICOMWEB

    def secret(self, environ: Mapping[str, str]) -> str:
        """The token (bearer) or password (basic) from ``environ``; a SettingsError naming the
        variable when it is not set."""
        variable = {DestinationAuth.BEARER: self.token_env, DestinationAuth.BASIC: self.password_env}.get(self.auth)
        if not variable:
            return ""
        value = environ.get(variable)
        if not value:
            raise SettingsError(f"destinations.{self.name}.{'token_env' if self.auth == DestinationAuth.BEARER else 'password_env'}: "
                                f"environment variable {variable} is not set")
        return value


@dataclass(frozen=True)
class TLSSettings:
    """[tls]: DICOM TLS on the listener (files checked here, loaded by worker/net/tls.server_context)."""

    enabled: bool
    certificate: str
    private_key: str
    ca_certificates: str
    require_client_certificate: bool
    minimum_version: str

    def __post_init__(self) -> None:
        _check_bool("tls.enabled", self.enabled)
        _check_bool("tls.require_client_certificate", self.require_client_certificate)
        _check_choice("tls.minimum_version", self.minimum_version, ("TLSv1.2", "TLSv1.3"))
        for key in ("certificate", "private_key", "ca_certificates"):
            value = getattr(self, key)
            if not isinstance(value, (str, Path)):
                raise SettingsError(f"tls.{key}: expected a file path (string), got {value!r}")
            if self.enabled:  # files are checked only when TLS is on
                value = _check_file(f"tls.{key}", value, required=key != "ca_certificates")
            object.__setattr__(self, key, str(value))
        if self.enabled and self.require_client_certificate and not self.ca_certificates:
            raise SettingsError("tls.require_client_certificate: needs tls.ca_certificates (the CA of the clients)")


@dataclass(frozen=True)
class NetworkSettings:
    ae_title: str
    bind_address: str
    port: int
    max_associations: int
    max_pdu: int
    require_called_aet: bool
    allowed_calling_aets: list[str]
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    association_request_timeout: float
    max_pending_connections: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", _check_ae("network.ae_title", self.ae_title))
        _check_num("network.port", self.port, minimum=0, integer=True)
        if self.port > 65535:
            raise SettingsError(f"network.port: {self.port} > 65535")
        _check_num("network.max_associations", self.max_associations, minimum=1, integer=True)
        _check_num("network.max_pdu", self.max_pdu, minimum=0, integer=True)
        if 0 < self.max_pdu < 4096:
            raise SettingsError("network.max_pdu: use 0 (unlimited) or at least 4096")
        _check_bool("network.require_called_aet", self.require_called_aet)
        aets = _check_str_list("network.allowed_calling_aets", self.allowed_calling_aets)
        object.__setattr__(self, "allowed_calling_aets",
                           [_check_ae("network.allowed_calling_aets", a) for a in aets])
        for key in ("acse_timeout", "dimse_timeout", "network_timeout"):
            _check_num(f"network.{key}", getattr(self, key), minimum=0.1)
        _check_num("network.association_request_timeout", self.association_request_timeout, minimum=0.1)
        _check_num("network.max_pending_connections", self.max_pending_connections, minimum=1, integer=True)

    @property
    def local_address(self) -> str:
        """Where a client on this machine reaches the listener (`echo`/`send` by default): the bind
        address, or loopback when the listener binds every interface."""
        return "127.0.0.1" if self.bind_address in ("", "0.0.0.0", "::") else self.bind_address


@dataclass(frozen=True)
class StorageSettings:
    data_dir: Path
    database_url: str
    sqlite_busy_timeout_ms: int
    writeback_bytes: int
    min_free_bytes: int

    def __post_init__(self) -> None:
        if not str(self.data_dir):
            raise SettingsError("storage.data_dir: must not be empty")
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())
        if not isinstance(self.database_url, str):
            raise SettingsError("storage.database_url: expected a string")
        _check_num("storage.sqlite_busy_timeout_ms", self.sqlite_busy_timeout_ms, minimum=0, integer=True)
        _check_num("storage.writeback_bytes", self.writeback_bytes, minimum=0, integer=True)
        _check_num("storage.min_free_bytes", self.min_free_bytes, minimum=0, integer=True)

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'worker.db'}"


@dataclass(frozen=True)
class StudySettings:
    quiet_seconds: float
    lease_seconds: float
    rescore_late_arrivals: bool

    def __post_init__(self) -> None:
        _check_num("studies.quiet_seconds", self.quiet_seconds, minimum=0)
        _check_num("studies.lease_seconds", self.lease_seconds, minimum=1)
        _check_bool("studies.rescore_late_arrivals", self.rescore_late_arrivals)


@dataclass(frozen=True)
class IntendedUseSettings:
    """[intended_use]: the site's word over the checkpoint's intended use (worker/scoring/intended_use.py)."""

    modalities: list[str]
    body_parts: list[str]
    view_positions: list[str]
    min_age_years: float
    max_age_years: float
    outside: str

    def __post_init__(self) -> None:
        for key in ("modalities", "body_parts", "view_positions"):
            object.__setattr__(self, key, [v.upper() for v in _check_str_list(f"intended_use.{key}",
                                                                               getattr(self, key))])
        _check_num("intended_use.min_age_years", self.min_age_years)
        _check_num("intended_use.max_age_years", self.max_age_years)
        if 0 <= self.max_age_years < self.min_age_years:
            raise SettingsError(f"intended_use.max_age_years {self.max_age_years} is below min_age_years "
                                f"{self.min_age_years}")
        _check_choice("intended_use.outside", self.outside, ("decline", "flag"))


@dataclass(frozen=True)
class ModelSettings:
    path: Path
    device: str
    precision: str
    batch_size: int
    max_studies_per_batch: int
    decode_threads: int
    decode_processes: bool
    torch_threads: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser() if str(self.path) else DEFAULT_MODEL)
        _check_choice("model.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("model.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _check_num("model.batch_size", self.batch_size, minimum=1, integer=True)
        _check_num("model.max_studies_per_batch", self.max_studies_per_batch, minimum=1, integer=True)
        _check_num("model.decode_threads", self.decode_threads, minimum=1, integer=True)
        _check_bool("model.decode_processes", self.decode_processes)
        _check_num("model.torch_threads", self.torch_threads, minimum=0, integer=True)


@dataclass(frozen=True)
class SRSettings:
    manufacturer: str
    series_number: int

    def __post_init__(self) -> None:
        if not isinstance(self.manufacturer, str) or not self.manufacturer:
            raise SettingsError("sr.manufacturer: expected a non-empty string")
        _check_num("sr.series_number", self.series_number, minimum=1, integer=True)


class HeatmapObject:
    """``heatmap.objects`` values: the DICOM objects made of an assessed image's map (worker/heatmap)."""

    SEGMENTATION = "segmentation"  # the quantitative map: a fractional Segmentation at the source's geometry
    KEY_IMAGE = "key_image"        # the picture: an RGB Secondary Capture with the overlay burned in
    ALL = (SEGMENTATION, KEY_IMAGE)


class HeatmapStudies:
    """``heatmap.studies``: which studies get heatmap objects."""

    POSITIVE = "positive"  # studies whose finding is positive (the map explains the "pneumonia")
    ALL = "all"            # every assessed study (a negative study's map shows what evidence there was)
    NONE = "none"          # none: maps are not computed at all
    CHOICES = (POSITIVE, ALL, NONE)


@dataclass(frozen=True)
class HeatmapSettings:
    """[heatmap]: class-activation maps as DICOM objects in new series of the study, referenced by the SR."""

    objects: list[str]
    studies: str
    segmentation_series_number: int
    key_image_series_number: int
    key_image_size: int
    segmentation_compression: str

    def __post_init__(self) -> None:
        objects = _check_str_list("heatmap.objects", self.objects)
        unknown = [o for o in objects if o not in HeatmapObject.ALL]
        if unknown:
            raise SettingsError(f"heatmap.objects: unknown object {unknown[0]!r} (known: "
                                f"{', '.join(HeatmapObject.ALL)})")
        object.__setattr__(self, "objects", list(dict.fromkeys(objects)))
        _check_choice("heatmap.studies", self.studies, HeatmapStudies.CHOICES)
        _check_num("heatmap.segmentation_series_number", self.segmentation_series_number, minimum=1, integer=True)
        _check_num("heatmap.key_image_series_number", self.key_image_series_number, minimum=1, integer=True)
        _check_num("heatmap.key_image_size", self.key_image_size, minimum=256, integer=True)
        _check_choice("heatmap.segmentation_compression", self.segmentation_compression, ("none", "rle"))
        if self.key_image_size > 4096:
            raise SettingsError(f"heatmap.key_image_size: at most 4096, got {self.key_image_size}")

    @property
    def enabled(self) -> bool:
        """Maps are computed (some studies get some objects)."""
        return self.studies != HeatmapStudies.NONE and bool(self.objects)

    def wanted(self, positive: bool | None) -> bool:
        """Whether a study with this decision (None: not assessed) gets heatmap objects."""
        if not self.enabled or positive is None:
            return False
        return positive or self.studies == HeatmapStudies.ALL


@dataclass(frozen=True)
class OutboxSettings:
    retry_base_seconds: float
    retry_max_seconds: float
    timeout: float
    poll_seconds: float
    idle_release_seconds: float

    def __post_init__(self) -> None:
        _check_num("outbox.retry_base_seconds", self.retry_base_seconds, minimum=0.01)
        _check_num("outbox.retry_max_seconds", self.retry_max_seconds, minimum=self.retry_base_seconds)
        _check_num("outbox.timeout", self.timeout, minimum=0.1)
        _check_num("outbox.poll_seconds", self.poll_seconds, minimum=0.01)
        _check_num("outbox.idle_release_seconds", self.idle_release_seconds, minimum=0)

    def backoff(self, attempts: int) -> float:
        """Delay before the next try after ``attempts`` failures (exponential, capped)."""
        return min(self.retry_max_seconds, self.retry_base_seconds * 2 ** max(0, min(attempts - 1, 30)))


@dataclass(frozen=True)
class HTTPSettings:
    """[http]: the HTTP face (worker/http): /healthz, /readyz, /metrics and the web pages."""

    enabled: bool
    bind_address: str
    port: int
    tls: bool
    bearer_token: str
    show_patient_data: bool
    refresh_seconds: int
    recent_studies: int

    def __post_init__(self) -> None:
        _check_bool("http.enabled", self.enabled)
        if not isinstance(self.bind_address, str) or not self.bind_address:
            raise SettingsError(f"http.bind_address: expected an address, got {self.bind_address!r}")
        _check_num("http.port", self.port, minimum=0, integer=True)
        if self.port > 65535:
            raise SettingsError(f"http.port: {self.port} > 65535")
        _check_bool("http.tls", self.tls)
        if not isinstance(self.bearer_token, str):
            raise SettingsError("http.bearer_token: expected a string (\"\" = no token)")
        _check_bool("http.show_patient_data", self.show_patient_data)
        _check_num("http.refresh_seconds", self.refresh_seconds, minimum=0, integer=True)
        _check_num("http.recent_studies", self.recent_studies, minimum=1, integer=True)

    @property
    def local_address(self) -> str:
        """Where a client on this machine reaches the HTTP server."""
        return "127.0.0.1" if self.bind_address in ("0.0.0.0", "::") else self.bind_address


_PACKAGED = "config/worker.toml must define every key (the merged configuration starts from it)"


def _value(raw: Mapping[str, Any], key: str) -> Any:
    if key not in raw:
        raise SettingsError(f"{key}: no value; {_PACKAGED}")
    return raw[key]


def _section(raw: Mapping[str, Any], name: str, keys: set[str]) -> Mapping[str, Any]:
    """The table ``[name]``, checked to hold exactly ``keys``."""
    table = _value(raw, name)
    if not isinstance(table, Mapping):
        raise SettingsError(f"{name}: expected a table, got {table!r}")
    missing, unknown = sorted(keys - table.keys()), sorted(table.keys() - keys)
    if missing:
        raise SettingsError(f"{name}.{missing[0]}: no value; {_PACKAGED}")
    if unknown:
        raise SettingsError(f"{name}.{unknown[0]}: unknown configuration key")
    return table


_DESTINATION_KEYS = [f.name for f in fields(Destination)]
_DESTINATION_REQUIRED = [f.name for f in fields(Destination) if f.default is MISSING]


def _destination(index: int, table: Mapping[str, Any]) -> Destination:
    """One destinations entry, its missing and unknown keys named (not a TypeError of __init__)."""
    label = f"destinations[{index}]" + (f" ({table['name']!r})" if isinstance(table.get("name"), str) else "")
    required = _DESTINATION_REQUIRED + (["url"] if table.get("kind") == DestinationKind.DICOMWEB
                                        else ["host", "port", "ae_title"])
    missing = [k for k in required if k not in table]
    if missing:
        raise SettingsError(f"{label}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                            f"(required: {', '.join(required)})")
    unknown = sorted(set(table) - set(_DESTINATION_KEYS))
    if unknown:
        raise SettingsError(f"{label}.{unknown[0]}: unknown key (known: {', '.join(_DESTINATION_KEYS)})")
    return Destination(**table)


#: The TOML tables read into one dataclass each ([logging] and destinations are read by Settings).
SECTIONS: dict[str, type] = {"network": NetworkSettings, "storage": StorageSettings, "studies": StudySettings,
                             "intended_use": IntendedUseSettings, "model": ModelSettings, "sr": SRSettings,
                             "heatmap": HeatmapSettings, "outbox": OutboxSettings, "tls": TLSSettings, "http": HTTPSettings}


@dataclass(frozen=True)
class Settings:
    network: NetworkSettings
    storage: StorageSettings
    studies: StudySettings
    intended_use: IntendedUseSettings
    model: ModelSettings
    sr: SRSettings
    heatmap: HeatmapSettings
    outbox: OutboxSettings
    destinations: list[Destination]
    log_level: str                   # [logging] level
    tls: TLSSettings
    http: HTTPSettings

    def __post_init__(self) -> None:
        if self.http.enabled and self.http.tls:  # HTTPS uses the listener's certificate and key
            for key in ("certificate", "private_key"):
                if not getattr(self.tls, key):
                    raise SettingsError(f"http.tls: needs tls.{key} (HTTPS uses the [tls] certificate and key)")
                _check_file(f"tls.{key}", getattr(self.tls, key), required=True)
        numbers = {"sr.series_number": self.sr.series_number}
        if HeatmapObject.SEGMENTATION in self.heatmap.objects:
            numbers["heatmap.segmentation_series_number"] = self.heatmap.segmentation_series_number
        if HeatmapObject.KEY_IMAGE in self.heatmap.objects:
            numbers["heatmap.key_image_series_number"] = self.heatmap.key_image_series_number
        if len(set(numbers.values())) != len(numbers):
            raise SettingsError(f"series numbers must differ: {numbers}")
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise SettingsError(f"destinations: names must be unique, got {names}")
        _check_choice("logging.level", self.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Settings":
        """The merged configuration (packaged TOML + site file + environment) -> validated Settings."""
        dests = _value(raw, "destinations")
        if not isinstance(dests, list) or not all(isinstance(d, Mapping) for d in dests):
            raise SettingsError(f"destinations: expected a list of tables {{name, host, port, ae_title}}, got "
                                f"{dests!r} (a site file: [[destinations]] tables; the environment: "
                                "CXR_WORKER__DESTINATIONS='[{name = \"pacs\", host = \"10.0.0.5\", port = 104, "
                                "ae_title = \"PACS\"}]')")
        sections = {name: section_type(**_section(raw, name, {f.name for f in fields(section_type)}))
                    for name, section_type in SECTIONS.items()}
        level = _section(raw, "logging", {"level"})["level"]
        return cls(**sections, destinations=[_destination(i, d) for i, d in enumerate(dests)],
                   log_level=str(level).upper())


def load_settings(site_file: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Packaged config/worker.toml + site file + CXR_WORKER__* environment -> validated Settings."""
    try:
        raw = cxr_config.load("worker", "CXR_WORKER", site_file, environ)
    except cxr_config.ConfigError as exc:  # unknown key, TOML syntax error, missing file: named there
        raise SettingsError(str(exc)) from None
    return Settings.from_dict(raw)

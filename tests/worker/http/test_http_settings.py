"""[http] and storage.min_free_bytes in worker/settings.py: defaults from config/worker.toml, checks naming the key."""

from __future__ import annotations

import pytest

from worker.settings import SettingsError, load_settings


def test_packaged_defaults():
    s = load_settings(environ={})
    assert s.http.enabled and s.http.bind_address == "127.0.0.1" and s.http.port == 11180
    assert s.http.bearer_token == "" and s.http.show_patient_data is False and not s.http.tls
    assert s.storage.min_free_bytes == 1 << 30


@pytest.mark.parametrize("variable, value, key", [
    ("CXR_WORKER__HTTP__PORT", "70000", "http.port"),
    ("CXR_WORKER__HTTP__ENABLED", '"yes"', "http.enabled"),
    ("CXR_WORKER__HTTP__SHOW_PATIENT_DATA", "1", "http.show_patient_data"),
    ("CXR_WORKER__HTTP__REFRESH_SECONDS", "-1", "http.refresh_seconds"),
    ("CXR_WORKER__STORAGE__MIN_FREE_BYTES", "-5", "storage.min_free_bytes"),
    ("CXR_WORKER__HTTP__TLS", "true", "http.tls"),  # no [tls] certificate to serve HTTPS with
])
def test_bad_values_name_the_key(variable, value, key):
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
        load_settings(environ={variable: value})


def test_http_tls_needs_existing_certificate_files(tmp_path):
    with pytest.raises(SettingsError, match=r"tls\.certificate"):
        load_settings(environ={"CXR_WORKER__HTTP__TLS": "true",
                               "CXR_WORKER__TLS__CERTIFICATE": str(tmp_path / "missing.crt"),
                               "CXR_WORKER__TLS__PRIVATE_KEY": str(tmp_path / "missing.key")})

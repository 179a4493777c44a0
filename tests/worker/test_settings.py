"""Settings: config/worker.toml is the one copy of every default; the dataclasses only validate.

The peer defaults of `cxr-worker echo` / `send` come from the same settings, so an environment
override reaches them as it reaches `serve`, `results` and `status`.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

import cxr_config
from testkit.dicom_factory import make_file
from testkit.env import REPO_ROOT, free_port
from worker.settings import SECTIONS, DEFAULT_MODEL, Settings, SettingsError, load_settings


def packaged() -> dict:
    return cxr_config.packaged_defaults("worker")


def test_packaged_toml_and_dataclasses_have_the_same_keys():
    raw = packaged()
    assert set(raw) == set(SECTIONS) | {"logging", "destinations"}
    for name, section_type in SECTIONS.items():
        assert set(raw[name]) == {f.name for f in dataclasses.fields(section_type)}, name
    assert set(raw["logging"]) == {"level"}
    assert {f.name for f in dataclasses.fields(Settings)} == set(SECTIONS) | {"destinations", "log_level"}


def test_the_dataclasses_carry_no_second_default():
    for section_type in (*SECTIONS.values(), Settings):
        for f in dataclasses.fields(section_type):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, \
                f"{section_type.__name__}.{f.name} has a default: it belongs in config/worker.toml"


@pytest.mark.parametrize("section, key", [("model", "batch_size"), ("network", "port"), ("logging", "level")])
def test_a_key_missing_from_the_packaged_toml_is_named(section, key):
    raw = packaged()
    del raw[section][key]
    with pytest.raises(SettingsError, match=rf"{section}\.{key}: no value; config/worker.toml must define"):
        Settings.from_dict(raw)
    raw = packaged()
    del raw[section]
    with pytest.raises(SettingsError, match=rf"^{section}: no value"):
        Settings.from_dict(raw)


def test_a_packaged_key_the_settings_do_not_read_is_an_error():
    raw = packaged()
    raw["outbox"]["retry_forever"] = True
    with pytest.raises(SettingsError, match="outbox.retry_forever: unknown configuration key"):
        Settings.from_dict(raw)


def test_settings_validation_and_backoff(tmp_path):
    s = load_settings(environ={"CXR_WORKER__NETWORK__PORT": "11999",
                               "CXR_WORKER__DESTINATIONS": '[{name="p", host="h", port=104, ae_title="PACS"}]'})
    assert s.network.port == 11999 and s.destinations[0].ae_title == "PACS"
    with pytest.raises(SettingsError, match="ae_title"):
        load_settings(environ={"CXR_WORKER__NETWORK__AE_TITLE": "THIS_AE_TITLE_IS_TOO_LONG"})
    with pytest.raises(SettingsError, match=r"^network\.prot: unknown key .*environment variable "
                                            r"CXR_WORKER__NETWORK__PROT"):
        load_settings(environ={"CXR_WORKER__NETWORK__PROT": "1"})
    backoff = dataclasses.replace(load_settings(environ={}).outbox, retry_base_seconds=2, retry_max_seconds=30)
    assert [backoff.backoff(n) for n in (1, 2, 3, 4, 5, 6)] == [2, 4, 8, 16, 30, 30]


def test_idle_release_setting_validated():
    outbox = load_settings(environ={}).outbox
    assert outbox.idle_release_seconds == 2.0
    with pytest.raises(SettingsError, match="idle_release_seconds"):
        dataclasses.replace(outbox, idle_release_seconds=-1)


def test_empty_model_path_is_the_shipped_model(tmp_path):
    assert load_settings(environ={}).model.path == DEFAULT_MODEL
    other = tmp_path / "m.safetensors"
    assert load_settings(environ={"CXR_WORKER__MODEL__PATH": f'"{other}"'}).model.path == other


@pytest.mark.parametrize("bind, host", [("0.0.0.0", "127.0.0.1"), ("::", "127.0.0.1"), ("127.0.0.2", "127.0.0.2")])
def test_local_address_is_loopback_unless_one_address_is_bound(bind, host):
    net = load_settings(environ={"CXR_WORKER__NETWORK__BIND_ADDRESS": f'"{bind}"'}).network
    assert net.local_address == host


class RecordingSCP:
    """A pynetdicom Verification + DX Storage SCP that records who called it, as which AE."""

    def __init__(self, ae_title: str) -> None:
        self.calls: list[tuple[str, str, str]] = []  # (DIMSE, calling AE, called AE)
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = True
        self.ae.add_supported_context(Verification)
        self.ae.add_supported_context(DigitalXRayImageStorageForPresentation)
        self.port = free_port()
        self.lock = threading.Lock()

    def _record(self, kind: str, event) -> int:
        with self.lock:
            self.calls.append((kind, event.assoc.requestor.ae_title, event.assoc.acceptor.ae_title))
        return 0x0000

    def __enter__(self) -> "RecordingSCP":
        handlers = [(evt.EVT_C_ECHO, lambda e: self._record("C-ECHO", e)),
                    (evt.EVT_C_STORE, lambda e: self._record("C-STORE", e))]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()


def test_environment_reaches_echo_through_the_real_cli():
    with RecordingSCP("ENV_WORKER") as scp:
        env = dict(os.environ, CXR_WORKER__NETWORK__PORT=str(scp.port), CXR_WORKER__NETWORK__AE_TITLE="ENV_WORKER")
        run = subprocess.run([sys.executable, "-m", "worker", "echo", "--timeout", "10"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert f"C-ECHO ENV_WORKER@127.0.0.1:{scp.port}: status 0x0000" in run.stdout
    assert scp.calls == [("C-ECHO", "ENV_WORKER", "ENV_WORKER")]  # calling AE: network.ae_title too


def test_environment_reaches_send_and_flags_still_win(tmp_path, monkeypatch, capsys):
    from worker.cli.main import main

    image = make_file(tmp_path / "dx.dcm", np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 4096,
                      bits_stored=12)
    with RecordingSCP("ENV_WORKER") as scp:
        monkeypatch.setenv("CXR_WORKER__NETWORK__PORT", str(scp.port))
        monkeypatch.setenv("CXR_WORKER__NETWORK__AE_TITLE", "ENV_WORKER")
        assert main(["send", "--no-progress", str(image)]) == 0
        # Flags override the configuration: the port and AE titles given win over the environment.
        monkeypatch.setenv("CXR_WORKER__NETWORK__PORT", str(free_port()))
        monkeypatch.setenv("CXR_WORKER__NETWORK__AE_TITLE", "NOBODY")
        assert main(["send", "--no-progress", "--port", str(scp.port), "--aec", "ENV_WORKER", "--aet", "MODALITY",
                     str(image)]) == 0
    assert "sent 1, failed 0" in capsys.readouterr().out
    assert scp.calls == [("C-STORE", "ENV_WORKER", "ENV_WORKER"), ("C-STORE", "MODALITY", "ENV_WORKER")]


def test_a_bad_environment_stops_echo_but_not_when_every_peer_flag_is_given(monkeypatch, capsys):
    from worker.cli.main import main

    monkeypatch.setenv("CXR_WORKER__NETWORK__PORT", "70000")
    assert main(["echo", "--timeout", "3"]) == 2
    assert "network.port" in capsys.readouterr().err
    port = free_port()  # nothing listens: the command runs (and fails to connect) without reading the config
    assert main(["echo", "--host", "127.0.0.1", "--port", str(port), "--aec", "X", "--aet", "Y", "--timeout", "3"]) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_destination_tables_name_their_missing_and_unknown_keys():
    raw = packaged()
    raw["destinations"] = [{"name": "pacs", "port": 104}]
    with pytest.raises(SettingsError, match=r"^destinations\[0\] \('pacs'\): missing keys host, ae_title"):
        Settings.from_dict(raw)
    raw["destinations"] = [{"name": "pacs", "host": "h", "port": 104, "ae_title": "P", "tls_ca": ""}]
    with pytest.raises(SettingsError, match=r"^destinations\[0\] \('pacs'\)\.tls_ca: unknown key"):
        Settings.from_dict(raw)


def test_destination_kinds_commitment_and_dicomweb_keys_are_checked_by_name():
    def one(**table):
        raw = packaged()
        raw["destinations"] = [{"name": "d", **table}]
        return Settings.from_dict(raw).destinations[0]

    dimse = one(host="h", port=104, ae_title="P", storage_commitment=True, commitment_timeout=5)
    assert dimse.kind == "dimse" and dimse.storage_commitment and not dimse.is_dicomweb
    web = one(kind="dicomweb", url="https://pacs.example/dicom-web/", auth="bearer", token_env="PACS_TOKEN")
    assert web.url == "https://pacs.example/dicom-web" and web.is_dicomweb
    assert web.secret({"PACS_TOKEN": "abc"}) == "abc"
    with pytest.raises(SettingsError, match=r"^destinations\.d\.token_env: environment variable PACS_TOKEN is not set"):
        web.secret({})
    with pytest.raises(SettingsError, match=r"^destinations\[0\] \('d'\): missing key url"):
        one(kind="dicomweb")
    with pytest.raises(SettingsError, match=r"^destinations\.d\.kind: expected one of dimse, dicomweb"):
        one(kind="ftp", host="h", port=1, ae_title="P")
    with pytest.raises(SettingsError, match=r"^destinations\.d\.url: expected an http:// or https://"):
        one(kind="dicomweb", url="pacs:8042")
    with pytest.raises(SettingsError, match=r"^destinations\.d\.storage_commitment: DICOM Storage Commitment needs"):
        one(kind="dicomweb", url="http://p/dw", storage_commitment=True)
    with pytest.raises(SettingsError, match=r"^destinations\.d\.commitment_timeout: must be >= 1"):
        one(host="h", port=104, ae_title="P", commitment_timeout=0)
    with pytest.raises(SettingsError, match=r"^destinations\.d: auth = \"basic\" needs username and password_env"):
        one(kind="dicomweb", url="http://p/dw", auth="basic", username="u")
    with pytest.raises(SettingsError, match=r"^destinations\.d\.url: only for kind = \"dicomweb\""):
        one(host="h", port=104, ae_title="P", url="http://p/dw")
    with pytest.raises(SettingsError, match=r"^destinations\.d\.token_env: expected the name of an environment"):
        one(kind="dicomweb", url="http://p/dw", auth="bearer", token_env="not a name")


def test_syntax_errors_are_reported_as_such(tmp_path):
    with pytest.raises(SettingsError, match=r"CXR_WORKER__DESTINATIONS: TOML syntax error .*at column 9"):
        load_settings(environ={"CXR_WORKER__DESTINATIONS": '[{"name": "x"}]'})
    site = tmp_path / "site.toml"
    site.write_text("[network]\nport = \n")
    with pytest.raises(SettingsError, match=r"site\.toml: TOML syntax error: .*line 2"):
        load_settings(site, environ={})
    with pytest.raises(SettingsError, match=r"nothere\.toml \(--config\): no such file"):
        load_settings(tmp_path / "nothere.toml", environ={})
    # a plain string that is not TOML stays a string (then validated where it is read)
    assert load_settings(environ={"CXR_WORKER__NETWORK__BIND_ADDRESS": "127.0.0.1"}).network.bind_address == "127.0.0.1"

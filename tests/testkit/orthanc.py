"""Test harness: a real Orthanc PACS on free loopback ports, driven over its REST API (urllib only).

    with OrthancServer(modalities={"worker": ["CXR_WORKER", "127.0.0.1", port]}) as pacs:
        pacs.upload(path); pacs.store_to_modality("worker", [instance_id])
        pacs.stop(); ...; pacs.start()   # same ports and storage: "destination down, then up"

    OrthancServer(plugins=["dicomweb"])           # STOW-RS at pacs.dicomweb_url (plugin DICOMWEB_PLUGIN)
    OrthancServer(users={"alice": "secret"})      # HTTP authentication; the REST helpers log in as the first

Tests import it as `from testkit.orthanc import OrthancServer`.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from testkit.env import IN_CI, free_port, require_tool

ORTHANC = "Orthanc"
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
#: Short plugin names -> the Debian packages' libraries (orthanc-dicomweb, orthanc-webviewer).
PLUGINS = {"dicomweb": "libOrthancDicomWeb.so", "webviewer": "libOrthancWebViewer.so"}
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.1


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed."""


class OrthancServer:
    """A throw-away Orthanc: own config, storage dir and ports; stopped and removed on exit."""

    def __init__(
        self,
        aet: str = "ORTHANC",
        modalities: dict[str, list[Any]] | None = None,
        *,
        workdir: Path | None = None,
        extra_config: dict[str, Any] | None = None,
        plugins: list[str] | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        require_tool(ORTHANC)
        libraries = []
        for name in plugins or []:
            library = PLUGIN_DIR / PLUGINS.get(name, name)
            if not library.is_file():
                message = f"Orthanc plugin not installed: {library}"
                if IN_CI:
                    pytest.fail(message + " (CI=true: .ci/run must install it)")
                pytest.skip(message)
            libraries.append(str(library))
        self.users = dict(users or {})
        self.aet = aet
        self.host = "127.0.0.1"
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="orthanc-"))
        self.storage = self.workdir / "storage"
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "config.json"
        config: dict[str, Any] = {
            "Name": f"test-{aet}",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "UnknownSopClassAccepted": True,
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "DicomModalities": modalities or {},
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "Plugins": libraries,
            "SaveJobs": False,
            "StableAge": 1,
            "DicomScuTimeout": 5,
            "DicomAssociationCloseDelay": 0,
            "StorageCompression": False,
        }
        if "dicomweb" in (plugins or []):
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        config.update(extra_config or {})
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config, indent=2))
        self._process: subprocess.Popen[bytes] | None = None
        self._log = None

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base URL (plugins=["dicomweb"]): STOW-RS is POST {dicomweb_url}/studies."""
        return f"{self.url}/dicom-web"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> OrthancServer:
        """Start (or restart) on the same ports and storage; returns when the REST API answers."""
        if self.running:
            return self
        self._log = open(self.log_path, "ab")
        self._process = subprocess.Popen(
            [shutil.which(ORTHANC) or ORTHANC, str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._close_log()
                raise OrthancError(f"Orthanc exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                self._request("GET", "/system", timeout=1)
                if self._dicom_listening():
                    return self
            except (OSError, OrthancError):
                pass
            time.sleep(POLL_S)
        self.stop()
        raise OrthancError(f"Orthanc did not answer within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def _dicom_listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.dicom_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Terminate and wait (kill if it hangs); storage is kept for a later start()."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop and remove the work directory (when we created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> OrthancServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # --- REST helpers ------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, *, timeout: float = 30,
                 content_type: str = "application/json") -> Any:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        if body is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code} {detail}") from exc
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return data

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, payload: Any = None, *, timeout: float = 30) -> Any:
        body = payload if isinstance(payload, bytes) else json.dumps(payload if payload is not None else {}).encode()
        return self._request("POST", path, body, timeout=timeout)

    def upload(self, path: str | Path) -> str:
        """POST a DICOM file to /instances; returns Orthanc's instance id."""
        answer = self._request("POST", "/instances", Path(path).read_bytes(), content_type="application/dicom")
        return str(answer["ID"])

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Tags by keyword (GET /instances/<id>/simplified-tags)."""
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def instance_file(self, instance_id: str) -> bytes:
        return bytes(self._request("GET", f"/instances/{instance_id}/file"))

    def find_study(self, study_uid: str) -> str | None:
        found = self.post("/tools/lookup", study_uid.encode())
        for item in found or []:
            if item.get("Type") == "Study":
                return str(item["ID"])
        return None

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Instances (Orthanc JSON, with MainDicomTags) of the study with this StudyInstanceUID."""
        study = self.find_study(study_uid)
        if study is None:
            return []
        return list(self.get(f"/studies/{study}/instances"))

    def store_to_modality(self, modality: str, resources: list[str], *, timeout: float = 60) -> Any:
        """C-STORE resources (Orthanc ids) to a configured modality, synchronously."""
        return self.post(f"/modalities/{modality}/store", {"Resources": list(resources), "Synchronous": True}, timeout=timeout)

    def set_modality(self, modality: str, aet: str, host: str, port: int) -> None:
        """Add or change a DICOM modality while Orthanc runs (PUT /modalities; until its restart)."""
        self._request("PUT", f"/modalities/{modality}", json.dumps({"AET": aet, "Host": host, "Port": port}).encode())

    def delete_instance(self, instance_id: str) -> None:
        self._request("DELETE", f"/instances/{instance_id}")

    def echo_modality(self, modality: str) -> bool:
        try:
            self.post(f"/modalities/{modality}/echo", {})
            return True
        except OrthancError:
            return False

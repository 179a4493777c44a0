"""DICOM TLS: the one place where SSLContexts are built (listener, outbox destinations, `send`/`echo`).

server_context() for the listener ([tls] settings) and client_context() for a TLS peer. Both load
and check the files at once (start-up), and turn any problem into a SettingsError that names the
key, so a bad certificate stops the worker before it listens instead of failing every handshake.
Private keys must be unencrypted PEM (protected by file mode 0600); an encrypted key is refused
rather than prompting on a terminal the service does not have.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

from ..settings import Destination, SettingsError, TLSSettings

log = logging.getLogger("cxr_worker.tls")

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _no_password() -> str:
    raise ValueError("the private key is encrypted; use an unencrypted PEM key (file mode 0600)")


def _load_chain(ctx: ssl.SSLContext, cert_key: str, certificate: str, key_key: str, private_key: str) -> None:
    for key, path in ((cert_key, certificate), (key_key, private_key)):
        if not Path(path).is_file():
            raise SettingsError(f"{key}: no such file: {path}")
    try:
        ctx.load_cert_chain(certificate, private_key, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise SettingsError(f"{cert_key}/{key_key}: cannot load certificate {certificate} with key "
                            f"{private_key}: {exc}") from exc
    try:
        if os.stat(private_key).st_mode & 0o077:
            log.warning("%s: private key %s is readable by group/other; chmod 600 it", key_key, private_key)
    except OSError:
        pass


def _load_cas(ctx: ssl.SSLContext, key: str, cafile: str) -> None:
    if not Path(cafile).is_file():
        raise SettingsError(f"{key}: no such file: {cafile}")
    try:
        ctx.load_verify_locations(cafile=cafile)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise SettingsError(f"{key}: cannot load CA certificates from {cafile}: {exc}") from exc


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The listener's context: our certificate; clients verified against ca_certificates.

    require_client_certificate: a client without a certificate signed by those CAs fails the
    handshake. Without it, a client certificate is optional (verified when one is presented and
    ca_certificates is set).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.minimum_version]
    _load_chain(ctx, "tls.certificate", tls.certificate, "tls.private_key", tls.private_key)
    if tls.ca_certificates:
        _load_cas(ctx, "tls.ca_certificates", tls.ca_certificates)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    elif tls.require_client_certificate:
        raise SettingsError("tls.require_client_certificate: needs tls.ca_certificates")
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(ca_certificates: str = "", certificate: str = "", private_key: str = "", *,
                   minimum_version: str = "TLSv1.2",
                   names: tuple[str, str, str] = ("tls_ca_certificates", "tls_certificate", "tls_private_key"),
                   ) -> ssl.SSLContext:
    """A client context: the peer's certificate is verified (CA file, else the system CAs) and its
    host name/IP must match; our certificate and key are presented when given. ``names`` are the
    option names used in error messages (config keys or command-line options)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = _VERSIONS[minimum_version]
    if ca_certificates:
        _load_cas(ctx, names[0], ca_certificates)
    if certificate or private_key:
        if not (certificate and private_key):
            raise SettingsError(f"{names[1]}/{names[2]}: a client certificate needs its private key and vice versa")
        _load_chain(ctx, names[1], certificate, names[2], private_key)
    return ctx


def destination_context(dest: Destination, minimum_version: str = "TLSv1.2") -> ssl.SSLContext | None:
    """The client context for an outbox destination, or None when it is plain TCP (a dicomweb
    destination: TLS when its url is https://, with the same CA and client certificate keys)."""
    if not (dest.url.startswith("https://") if getattr(dest, "is_dicomweb", False) else dest.tls):
        return None
    prefix = f"destinations.{dest.name}."
    return client_context(dest.tls_ca_certificates, dest.tls_certificate, dest.tls_private_key,
                          minimum_version=minimum_version,
                          names=(prefix + "tls_ca_certificates", prefix + "tls_certificate", prefix + "tls_private_key"))


def describe_peer(sock: ssl.SSLSocket) -> str:
    """'TLSv1.3 TLS_AES_256_GCM_SHA384, client certificate CN=...' for the log (no PHI involved)."""
    cipher = sock.cipher()
    text = f"{sock.version()} {cipher[0] if cipher else '?'}"
    cert = sock.getpeercert()
    if cert:
        subject = ", ".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
        text += f", client certificate {subject}"
    return text

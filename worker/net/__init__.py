"""The network: the only package of the worker that imports pynetdicom.

- ``listener``: the SCP (C-ECHO, C-STORE handler, TLS accept), answering what worker.receiver did;
- ``scu``: C-STORE and C-ECHO as a requestor (outbox delivery, ``cxr-worker send``/``echo``);
- ``associations``: the peer, opening associations, and keeping one per destination;
- ``status``: the DICOM status codes, and receive errors mapped to them in one place;
- ``tls``: DICOM TLS contexts;
- ``_pynetdicom``: the private touches of pynetdicom's internals, switched on process-wide by
  ``install()`` (re-exported here), which checks pynetdicom's version first.
"""

from ._pynetdicom import install

__all__ = ["install"]

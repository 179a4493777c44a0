#!/usr/bin/env python
"""A bare pynetdicom C-STORE SCP: the ceiling for a Python receiver (used by bench_ingest.py).

It does what any pynetdicom receiver must do and nothing else: pynetdicom spools each data set to
a file as it arrives (STORE_RECV_CHUNKED_DATASET: file meta + the bytes as sent, never decoded),
the handler renames that file into --out and answers Success. Same settings as the worker's
listener: max PDU 128 KiB, TCP_NODELAY on accepted sockets, every storage SOP class with the
usual transfer syntaxes. No fsync, no database, no parsing.

    python benchmarks/bare_scp.py --port 11120 --out /tmp/bare   # prints READY <port> when listening
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
]


class NoDelayServer(ThreadedAssociationServer):
    def get_request(self):
        sock, address = super().get_request()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return sock, address


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ae-title", default="BARE_SCP")
    ap.add_argument("--max-pdu", type=int, default=131072)
    ap.add_argument("--no-nodelay", action="store_true", help="leave Nagle on (to show its cost)")
    ap.add_argument("--fast-recv", action="store_true",
                    help="use the worker's socket read (worker/net/_pynetdicom/recv.py) instead of pynetdicom's, to show its effect")
    args = ap.parse_args(argv)
    if args.fast_recv:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from worker.net._pynetdicom import recv as fastrecv
        fastrecv.patch()  # only this one of worker.net.install()'s changes

    args.out.mkdir(parents=True, exist_ok=True)
    incoming = args.out / ".incoming"
    incoming.mkdir(exist_ok=True)
    tempfile.tempdir = str(incoming)        # pynetdicom spools here; same filesystem -> rename
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    count = [0]
    lock = threading.Lock()

    def on_store(event):
        with lock:
            count[0] += 1
            n = count[0]
        os.replace(event.dataset_path, args.out / f"{n:06d}.dcm")
        return 0x0000

    ae = AE(ae_title=args.ae_title)
    ae.maximum_pdu_size = args.max_pdu
    ae.require_called_aet = False
    ae.maximum_associations = 16
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    server_class = ThreadedAssociationServer if args.no_nodelay else NoDelayServer
    server = ae.make_server((args.host, args.port), server_class=server_class,
                            evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, lambda e: 0x0000)])
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, name="accept", daemon=True).start()
    print(f"READY {server.server_address[1]}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    print(f"received {count[0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Reproduce the lost C-STORE response in worker/scu.store_files under GIL contention.

pynetdicom 3.0.x, requestor side: send_c_store() pauses the association's reactor thread with
``_reactor_checkpoint.clear()`` and then waits for ``_is_paused``. The reactor sets ``_is_paused =
True`` *before* its ``checkpoint.wait()``; when it has already passed the wait, it goes on to
``dimse.get_msg(block=False)`` and can take the C-STORE-RSP off the queue ("Received unexpected
C-STORE service message"). send_c_store() then waits the full DIMSE timeout (worker: outbox.timeout,
30 s), the association is aborted and the rest of the batch fails. On loopback with a fast peer
(DCMTK storescp, TCP_NODELAY) the response is back within the window whenever other Python
threads hold the GIL, which in the worker they do (scorer, decode pool, SCP association threads).

    python benchmarks/scu_race.py                    # 40 associations x 8 files, 3 busy threads
    python benchmarks/scu_race.py --without-guard    # same, without the worker's fix
    python benchmarks/scu_race.py --quick --json race.json   # 10 associations x 8 files; results as JSON

The fix (worker/net/_pynetdicom/reactor.py, used by worker/scu.store_files) parks the reactor for the whole batch by
replacing its checkpoint with an Event whose set() is ignored until the batch is over, so the reactor
never competes with send_c_store() for the response.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def disable_guard() -> None:
    """Send without worker.reactor.reactor_parked, as the worker did before the fix."""
    import contextlib

    from worker.net import scu
    scu.reactor_parked = lambda assoc: contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--associations", type=int, default=None, help="associations to open (default 40; --quick: 10)")
    ap.add_argument("--files", type=int, default=8, help="files per association")
    ap.add_argument("--busy-threads", type=int, default=3, help="pure-Python threads competing for the GIL")
    ap.add_argument("--timeout", type=float, default=3.0, help="DIMSE timeout for the sends (worker: 30)")
    ap.add_argument("--without-guard", action="store_true", help="disable worker/net/_pynetdicom/reactor.py's fix")
    ap.add_argument("--quick", action="store_true", help="short smoke run: 10 associations unless --associations")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if args.associations is None:
        args.associations = 10 if args.quick else 40

    from bench_ingest import Proc, free_port, wait_port
    from testkit.dicom_factory import make_dataset, synthetic_radiograph
    from make_study_files import dcmtk_tool

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    if args.without_guard:
        disable_guard()
    from worker.net.scu import store_files

    work = Path(tempfile.mkdtemp(prefix="cxr-scu-race-"))
    files = []
    for k in range(args.files):
        path = work / f"f{k}.dcm"
        make_dataset(synthetic_radiograph(64, 64, seed=k)).save_as(path, enforce_file_format=True)
        files.append(path)
    (work / "in").mkdir()
    port = free_port()
    env = dict(os.environ, TCP_NODELAY="1")
    scp = Proc([dcmtk_tool("storescp"), "-aet", "DEST", "+B", "-od", str(work / "in"), str(port)], work / "scp.log",
               env=env)
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            x += sum(range(1000))

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(args.busy_threads)]
    try:
        wait_port(port, scp.p, 20, "DEST")
        for t in threads:
            t.start()
        failed = slow = 0
        start = time.perf_counter()
        for _ in range(args.associations):
            t0 = time.perf_counter()
            outcomes = store_files(files, "127.0.0.1", port, "DEST", calling_aet="RACE", timeout=args.timeout)
            failed += sum(not o.ok for o in outcomes)
            slow += (time.perf_counter() - t0) > args.timeout
        total = args.associations * args.files
        seconds = time.perf_counter() - start
        if args.json:
            args.json.write_text(json.dumps({"guard": not args.without_guard, "quick": args.quick,
                                             "associations": args.associations, "files": args.files,
                                             "busy_threads": args.busy_threads, "timeout": args.timeout,
                                             "failed": failed, "total": total, "timeouts": slow,
                                             "seconds": seconds}, indent=2))
        print(f"{'without' if args.without_guard else 'with'} the reactor guard, {args.busy_threads} busy threads: "
              f"{failed}/{total} C-STOREs failed, {slow}/{args.associations} associations hit the DIMSE timeout "
              f"({seconds:.1f} s)")
        return 1 if failed else 0
    finally:
        stop.set()
        scp.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

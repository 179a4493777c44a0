"""Several workers on one real PostgreSQL never take the same study (FOR UPDATE SKIP LOCKED claims).

The test starts a throwaway PostgreSQL cluster (Debian's postgresql package) on a free port as the
``postgres`` user; CI installs it. Each claimer has its own engine and connections, as separate
worker processes would.
"""

from __future__ import annotations

import threading
import time

from worker.store import db as dbm
from worker.store.db import Database, Study
from worker.store.studies import claim_ready

STUDIES = 60
CLAIMERS = 4


def test_workers_on_one_postgres_never_take_the_same_study(postgres_url):
    setup = Database(postgres_url)
    assert setup.is_postgres
    now = time.time()
    with setup.session() as s, s.begin():
        for i in range(STUDIES):
            s.add(Study(study_uid=f"9.9.{i}", status=dbm.STUDY_READY, n_instances=1, first_received=now,
                        last_received=now - STUDIES + i, updated=now, attempts=0, revision=0, scored_instances=0))
    taken: dict[str, list[str]] = {f"worker{k}": [] for k in range(CLAIMERS)}
    start = threading.Barrier(CLAIMERS)

    def claimer(name: str) -> None:
        db = Database(postgres_url, create=False)   # its own engine: like another worker process
        try:
            start.wait()
            while True:
                got = claim_ready(db, name, 2, 60)
                if not got:
                    return
                taken[name].extend(c.study_uid for c in got)
        finally:
            db.dispose()

    threads = [threading.Thread(target=claimer, args=(name,)) for name in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    everything = [uid for uids in taken.values() for uid in uids]
    assert sorted(everything) == sorted(f"9.9.{i}" for i in range(STUDIES))   # each exactly once
    assert sum(1 for uids in taken.values() if uids) >= 2, taken               # really concurrent
    with setup.session() as s:
        owners = dict(s.query(Study.study_uid, Study.lease_owner).all())
        assert {s.query(Study.status).distinct().scalar()} == {dbm.STUDY_SCORING}
    for name, uids in taken.items():
        assert all(owners[uid] == name for uid in uids)
    setup.dispose()

"""/readyz: is this worker fit to receive? Each check named, with what failed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..store.db import Database
from ..store.overview import ping
from ..store.spool import DiskWatermark


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return {"ok": self.ok, "detail": self.detail}


class Readiness:
    """The checks of /readyz: database reachable, disk above the watermark, model loaded, listener
    accepting (and the scorer and outbox threads alive)."""

    def __init__(self, db: Database, watermark: DiskWatermark, model_loaded: Callable[[], bool],
                 listener_accepting: Callable[[], bool], flows_alive: Callable[[], dict[str, bool]]) -> None:
        self.db = db
        self.watermark = watermark
        self.model_loaded = model_loaded
        self.listener_accepting = listener_accepting
        self.flows_alive = flows_alive

    def _database(self) -> Check:
        try:
            ping(self.db)
        except Exception as exc:  # noqa: BLE001 - the answer is the check's detail
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return Check("database", False, f"unreachable: {type(exc).__name__}: {first}"[:300])
        return Check("database", True, self.db.engine.dialect.name)

    def _disk(self) -> Check:
        try:
            space = self.watermark.measure()
        except OSError as exc:
            return Check("disk", False, f"statvfs failed: {exc}")
        if space.below_watermark:
            return Check("disk", False, f"{space.free_bytes} bytes free, below storage.min_free_bytes = "
                                        f"{space.min_free_bytes}: C-STOREs are answered 0xA700")
        return Check("disk", True, f"{space.free_bytes} bytes free (min {space.min_free_bytes})")

    def checks(self) -> list[Check]:
        out = [self._database(), self._disk()]
        loaded = self.model_loaded()
        out.append(Check("model", loaded, "loaded" if loaded else "not loaded"))
        accepting = self.listener_accepting()
        out.append(Check("listener", accepting, "accepting associations" if accepting else "not accepting"))
        for name, alive in self.flows_alive().items():
            out.append(Check(name, alive, "running" if alive else "thread not running"))
        return out

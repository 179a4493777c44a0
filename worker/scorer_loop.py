"""The scorer thread: ready studies -> dicom_io + model (batched across studies) -> result, SR, outbox.

Runs beside the network threads, never on them. Per claimed batch of studies:
  1. eligible instances of every study are decoded (dicom_io, in the runner's decode processes) and
     scored together (worker/scoring/runner.ModelRunner);
  2. an image is assessed when it was decoded, scored and is in distribution (the checkpoint's
     detector; worker/scoring/intended_use.assess); study probability (calibrated) = max over its
     assessed images, label by the checkpoint threshold on the calibrated scale. A study with no
     assessed image gets the "not analysed" SR (label NOT_ASSESSED, the reasons, no probability);
  3. the heatmap objects of the assessed images, when [heatmap] asks for them (worker/heatmap: the
     map's fractional Segmentation, the key image, the web page's JPEG), and the SR (worker.sr, from
     the source attributes kept at receive time, referencing the objects and the strongest region)
     are written atomically under sr/, with UIDs derived from (study, model UID, revision)
     (worker.sr.sr_uids, worker.heatmap heatmap_uids), so a crash-and-retry rewrites the same files;
  4. one transaction for the whole batch (one fsync): per study -> done/no_eligible_images, result
     row (one per study and model), outbox rows (one per destination and file: the objects go before
     the SR that references them, store/outbox.py), per-instance probability or
     reason. A study is only recorded while this worker still holds its lease.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pydicom
from sqlalchemy import insert, select, update

from .metrics import Metrics
from .scoring.intended_use import (IntendedUse, NotAssessed, Outside, assess, check_header, not_assessed_code,
                                   site_values)
from .store import outbox, studies
from .store.db import Database, Instance, Result, StudyState, clip
from .scoring.runner import DecodeBatch, Scored, ModelRunner
from .settings import Settings
from .store.spool import Spool
from .store.studies import ClaimedStudy, claim_ready, instances_of_many, next_due, reclaim_stale, release, renew

log = logging.getLogger("cxr_worker.pipeline")

#: Shortest idle sleep: a study due "now" is picked up on the next pass, without a busy loop.
MIN_IDLE_WAIT = 0.005


@dataclass
class Ahead:
    """A claimed batch whose images are being decoded."""

    claimed: list[ClaimedStudy]
    per_study: dict[int, list[Instance]]
    decoding: DecodeBatch


@dataclass
class Concluded:
    """A scored study's result row values and SR file, waiting for the batch's commit."""

    study: ClaimedStudy
    result: dict
    scored: list[Scored]
    reasons: dict[str, int]
    evidence: list[outbox.Evidence] = field(default_factory=list)  # heatmap objects, sent before the SR


class ScorerLoop(threading.Thread):
    """Claims and scores batches as a three-stage pipeline: while the model scores batch n, the
    images of batch n+1 are already decoding (decode processes) and batch n-1 is being finished
    (SRs, one commit) by a second thread. Decoding and inference release the GIL, SR building is
    pure Python, so the stages overlap on both cores. At most one batch is in each stage.
    """

    def __init__(self, settings: Settings, db: Database, spool: Spool, runner: ModelRunner, owner: str,
                 stop: threading.Event, poll_seconds: float = 0.2,
                 on_committed: Callable[[], None] | None = None, metrics: Metrics | None = None) -> None:
        super().__init__(name="scorer", daemon=True)
        self.metrics = metrics if metrics is not None else Metrics()
        self.settings, self.db, self.spool, self.runner = settings, db, spool, runner
        self.owner, self.stop_event, self.poll = owner, stop, min(poll_seconds, settings.studies.quiet_seconds or 0.2)
        self.poll = max(self.poll, 0.05)
        self.on_committed = on_committed  # called after a result with an SR is committed (wakes the outbox)
        self.scored_studies = 0
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer-finish")
        self._finishing: Future | None = None
        self.intended_use = IntendedUse.resolve(site_values(settings.intended_use), runner.info.intended_use)

    def run(self) -> None:
        last_reclaim = 0.0
        ahead: Ahead | None = None  # claimed, its images decoding while the model scores the previous batch
        while not self.stop_event.is_set():
            try:
                if time.monotonic() - last_reclaim > 5.0:
                    reclaim_stale(self.db)
                    last_reclaim = time.monotonic()
                claimed = claim_ready(self.db, self.owner, self.settings.model.max_studies_per_batch,
                                      self.settings.studies.lease_seconds, self.settings.studies.quiet_seconds)
                following = self.begin(claimed) if claimed else None
                if ahead is not None:
                    current, ahead = ahead, None
                    self.complete(current)
                ahead = following
                if ahead is None:
                    self.stop_event.wait(self._idle_wait())
            except Exception:  # noqa: BLE001 - log and keep the service alive
                log.exception("scorer loop error; retrying in 1 s")
                self.stop_event.wait(1.0)
        try:
            if ahead is not None:
                self.complete(ahead)
            self._wait_finishing()
        except Exception:  # noqa: BLE001 - stopping anyway; the studies' leases are re-taken on restart
            log.exception("finishing the last batch failed")
        self._finisher.shutdown(wait=True)

    def warm_up(self) -> None:
        """Pay the one-off costs (highdicom loads its standard tables on the first SR, ~1 s; the
        model's first forward pass) before the listener opens, not in the first studies' latency."""
        from .sr import PneumoniaReport, build_pneumonia_sr

        try:
            if self.settings.heatmap.enabled:
                from .heatmap.objects import warm_up

                self.runner.start_decoders(also=warm_up)
            else:
                self.runner.start_decoders()
            size = self.runner.info.input_size
            self.runner.predict(np.zeros((1, 1, size, size), dtype=np.float32))
            header = pydicom.Dataset()
            header.update({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1", "SOPInstanceUID": "2.25.1",
                           "StudyInstanceUID": "2.25.2", "SeriesInstanceUID": "2.25.3", "Rows": 1, "Columns": 1,
                           "Modality": "DX", "PatientID": ""})
            build_pneumonia_sr(PneumoniaReport([header], 0.5, True, self.runner.info))
        except Exception:  # noqa: BLE001 - only a warm-up; the real work reports its own errors
            log.debug("warm-up failed", exc_info=True)

    def _idle_wait(self) -> float:
        """Sleep until the next receiving study becomes due (quiet period over), at most ``poll``."""
        due = next_due(self.db, self.settings.studies.quiet_seconds)
        if due is None:
            return self.poll
        return min(self.poll, max(due - time.time(), MIN_IDLE_WAIT))

    def _wait_finishing(self) -> None:
        if self._finishing is not None:
            self._finishing.result()  # _finish_all handles its own errors
            self._finishing = None

    # -- one batch of studies -------------------------------------------------------------------
    def begin(self, claimed: list[ClaimedStudy]) -> Ahead:
        """Look up the studies' instances and start decoding their eligible images."""
        by_uid = instances_of_many(self.db, [c.study_uid for c in claimed])
        per_study: dict[int, list[Instance]] = {c.id: by_uid[c.study_uid] for c in claimed}
        items = [((c.id, inst.id), inst.path) for c in claimed for inst in per_study[c.id] if inst.eligible]
        return Ahead(claimed, per_study, self.runner.decode_async(items))

    def complete(self, ahead: Ahead) -> None:
        """Score the decoded images, then hand the batch to the finisher (SRs, one commit)."""
        claimed = ahead.claimed
        try:
            scored = self.runner.score_prepared(self.runner.collect(ahead.decoding))
        except Exception as exc:  # noqa: BLE001 - e.g. CUDA out of memory: give the studies back
            log.exception("batch scoring failed; releasing %d studies", len(claimed))
            release(self.db, self.owner, [c.id for c in claimed], f"scoring failed: {type(exc).__name__}: {exc}")
            for future in ahead.decoding.futures:  # the previews the decode processes kept for this batch
                if future.done() and future.exception() is None and future.result().preview_path is not None:
                    future.result().preview_path.unlink(missing_ok=True)
            return
        renew(self.db, self.owner, [c.id for c in claimed], self.settings.studies.lease_seconds)
        for s in scored:  # here, in this process: the decode processes cannot update its metrics
            self.metrics.decoded(s.prepared.transfer_syntax, s.prepared.decode_s)
        by_study: dict[int, list[Scored]] = defaultdict(list)
        for s in scored:
            by_study[s.prepared.key[0]].append(s)
        self._wait_finishing()
        self._finishing = self._finisher.submit(self._finish_all, claimed, ahead.per_study, by_study)

    def _finish_all(self, claimed: list[ClaimedStudy], per_study: dict[int, list[Instance]],
                    by_study: dict[int, list[Scored]]) -> None:
        """SR files for every study of the batch, then ONE transaction records them all; then the
        batch's previews kept in files (prepare.keep_preview) are removed, used or not."""
        try:
            self._finish_batch(claimed, per_study, by_study)
        finally:
            for scored in by_study.values():
                for s in scored:
                    if s.prepared.preview_path is not None:
                        s.prepared.preview_path.unlink(missing_ok=True)

    def _finish_batch(self, claimed: list[ClaimedStudy], per_study: dict[int, list[Instance]],
                      by_study: dict[int, list[Scored]]) -> None:
        concluded: list[Concluded] = []
        started: dict[int, tuple] = {}
        for study in claimed:  # every study's heatmap objects at once, in the decode processes, in parallel
            try:
                job = self._start_heatmaps(study, per_study[study.id], by_study.get(study.id, []))
                if job is not None:
                    started[study.id] = job
            except Exception:  # noqa: BLE001 - conclude tries again, and records what fails
                log.exception("study %s: heatmaps could not be started", study.study_uid)
        for study in claimed:
            try:
                concluded.append(self.conclude(study, per_study[study.id], by_study.get(study.id, []),
                                               started.get(study.id)))
            except Exception as exc:  # noqa: BLE001
                log.exception("study %s: finishing failed", study.study_uid)
                release(self.db, self.owner, [study.id], f"{type(exc).__name__}: {exc}")
        if not concluded:
            return
        try:
            finals = self._commit(concluded)
        except Exception as exc:  # noqa: BLE001 - e.g. the database went away: the studies go back
            log.exception("recording %d results failed", len(concluded))
            release(self.db, self.owner, [c.study.id for c in concluded], f"{type(exc).__name__}: {exc}")
            return
        for item in concluded:
            final = finals.get(item.study.id)
            if final is None:
                log.warning("study %s: lease lost before the result was committed; result discarded",
                            item.study.study_uid)
                continue
            self.scored_studies += 1
            self._log_result(item, final)
            received = [i.received for i in per_study[item.study.id] if i.received]
            self.metrics.study_concluded(item.result["status"], item.result["total_s"],
                                         time.time() - min(received) if received else None, item.reasons,
                                         json.loads(item.result["not_assessed_reasons"] or "[]"))
        if self.on_committed is not None and any(c.result["sr_path"] and c.study.id in finals for c in concluded):
            self.on_committed()

    def conclude(self, study: ClaimedStudy, instances: list[Instance], scored: list[Scored],
                 heatmaps_started: tuple | None = None) -> Concluded:
        """The study's result (max calibrated probability over its assessed images), its heatmap
        objects (``heatmaps_started``: _start_heatmaps' job, else started here) and its SR file (the
        "not analysed" variant when no image was assessed); no database."""
        model = self.runner.info
        inst_by_id = {i.id: i for i in instances}
        reasons = Counter(i.reason for i in instances if not i.eligible and i.reason)
        declined: dict[int, tuple[list[str], float | None]] = {
            i.id: ([not_assessed_code(i.reason)], i.ood_score) for i in instances if not i.eligible}
        ok: list[Scored] = []
        for s in scored:  # the header checks were the receiver's (decline) or are _flags' (flag)
            verdict = assess([], s.in_distribution, s.probability is not None, self.intended_use)
            if verdict.assessed:
                ok.append(s)
                continue
            reasons[s.prepared.error_reason or "decode_failed" if s.probability is None
                    else NotAssessed.OUT_OF_DISTRIBUTION.value] += 1
            declined[s.prepared.key[1]] = (list(verdict.reasons), s.ood_score)
        flags = self._flags([inst_by_id[s.prepared.key[1]] for s in ok])
        codes = list(dict.fromkeys(code for codes_, _ in declined.values() for code in codes_))
        scores = [s.ood_score for s in scored if s.ood_score is not None]
        revision = study.revision + 1
        result = dict(study_uid=study.study_uid, accession=study.accession, revision=revision,
                      threshold=self.runner.threshold, model_name=model.name, model_version=model.version,
                      model_uid=model.uid, n_instances=len(instances), n_scored=len(ok),
                      reasons=json.dumps(dict(reasons), sort_keys=True) if reasons else None,
                      decode_s=sum(s.prepared.decode_s for s in scored),
                      inference_s=sum(s.inference_s for s in scored if s.probability is not None),
                      device=str(self.runner.device),
                      probability=None, label=None, positive=None, error=None, sr_path=None,
                      sr_sop_instance_uid=None, sr_series_uid=None, best_instance_uid=None, sr_s=0.0,
                      assessed=bool(ok), not_assessed_reasons=json.dumps([] if ok else codes),
                      ood_score=max(scores) if scores else None, ood_threshold=self.runner.ood_threshold,
                      raw_probability=None, outside_intended_use=json.dumps(flags) if flags else None)
        best = max(ok, key=lambda s: s.probability) if ok else None
        if best is not None:
            label, positive = self.runner.label(best.probability)
            result.update(status=StudyState.DONE, probability=best.probability, label=label, positive=positive,
                          raw_probability=best.raw_probability, ood_score=best.ood_score,
                          best_instance_uid=inst_by_id[best.prepared.key[1]].sop_instance_uid)
        else:
            positive = None
            result.update(status=StudyState.NO_ELIGIBLE, label="NOT_ASSESSED",
                          error="no eligible image: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
        t0 = time.perf_counter()
        evidence: list[outbox.Evidence] = []
        try:
            if self.settings.heatmap.wanted(positive):
                job = heatmaps_started or self._start_heatmaps(study, instances, scored)
                heatmaps, evidence = self._heatmaps(study, job) if job is not None else ([], [])
            else:
                heatmaps = []
            sr = self._write_sr(study, [inst_by_id[s.prepared.key[1]] for s in ok],
                                best.probability if best else None, positive, revision,
                                [(inst_by_id[key], codes_, score) for key, (codes_, score) in declined.items()],
                                best.ood_score if best else None, heatmaps)
            if sr is not None:
                sr_file, series_uid, instance_uid = sr
                result.update(sr_path=str(sr_file), sr_sop_instance_uid=instance_uid, sr_series_uid=series_uid)
        except Exception as exc:  # noqa: BLE001 - recorded on the result; the study is 'failed'
            log.exception("study %s: SR could not be built", study.study_uid)
            result.update(status=StudyState.FAILED, error=f"sr_failed: {type(exc).__name__}: {exc}")
            evidence = []
        result["sr_s"] = time.perf_counter() - t0
        result["total_s"] = time.time() - study.claimed_at
        return Concluded(study, result, scored, dict(reasons), evidence)

    def _assessed(self, scored: list[Scored]) -> list[Scored]:
        """The scored images that are assessed (the header checks were the receiver's)."""
        return [s for s in scored if assess([], s.in_distribution, s.probability is not None,
                                            self.intended_use).assessed]

    def _start_heatmaps(self, study: ClaimedStudy, instances: list[Instance], scored: list[Scored]) -> tuple | None:
        """Start making the heatmap objects of a study whose decision [heatmap] wants them (in a decode
        process: ~50 ms of CPU a 2500 x 2048 image, most of it holding the GIL); None when none are due."""
        from trainer.cam import relevance

        from .heatmap.objects import ImageMap, make_all

        ok = self._assessed(scored)
        if not ok or not self.settings.heatmap.wanted(self.runner.label(max(s.probability for s in ok))[1]):
            return None
        inst_by_id = {i.id: i for i in instances}
        maps, mapped = [], []
        for s in ok:
            if s.cam is None or s.prepared.image_shape is None:
                continue
            inst = inst_by_id[s.prepared.key[1]]
            maps.append(ImageMap(self._header(inst), relevance(s.cam), s.prepared.image_shape, s.prepared.preview,
                                 s.probability, self.runner.label(s.probability)[0], s.prepared.frame,
                                 s.prepared.preview_path))
            mapped.append(inst)
        if not maps:
            return None
        return mapped, self.runner.submit_beside(make_all, maps, self.settings.heatmap, study.study_uid,
                                                 study.revision + 1, self.runner.info, self.runner.threshold,
                                                 self.settings.sr.manufacturer, self.spool.paths)

    def _heatmaps(self, study: ClaimedStudy, job: tuple) -> tuple[list, list[outbox.Evidence]]:
        """The started heatmap objects, which make_all wrote (with the web page's JPEGs) in one durable
        batch where it made them: the SR's HeatmapEvidence items and the outbox's Evidence rows."""
        _, beside = job
        sr_evidence, rows = [], []
        for made in beside.result():
            if made is None:  # nothing in the image spoke for the finding: no region, no objects
                continue
            rows += [outbox.Evidence(item.sop_instance_uid, str(item.path), item.kind) for item in made.files]
            sr_evidence.append(made.evidence)
        return sr_evidence, rows

    def _flags(self, assessed: list[Instance]) -> list[str]:
        """outside = flag: the header codes the assessed images were scored despite (the receiver
        declined them under decline)."""
        if self.intended_use.outside is not Outside.FLAG:
            return []
        from .sr import source_dataset

        found: list[str] = []
        for inst in assessed:
            header = source_dataset(inst.sr_attributes, inst.path)
            values = {k: header.get(k) for k in ("PatientAge", "PatientBirthDate", "StudyDate", "AcquisitionDate",
                                                 "ContentDate")}
            values.update(Modality=inst.modality, BodyPartExamined=inst.body_part, ViewPosition=inst.view_position)
            found += [code.value for code, _ in check_header(values, self.intended_use)]
        return list(dict.fromkeys(found))

    def _log_result(self, item: Concluded, final_status: str) -> None:
        result, study = item.result, item.study
        prob = f"{result['probability']:.4f}" if result["probability"] is not None else "-"
        log.info("study %s acc=%s status=%s prob=%s label=%s images=%d/%d rev=%d decode=%.3fs infer=%.3fs "
                 "sr=%.3fs total=%.3fs%s", study.study_uid, study.accession or "-", final_status, prob,
                 result["label"] or "-", result["n_scored"], result["n_instances"], result["revision"], result["decode_s"],
                 result["inference_s"], result["sr_s"], result["total_s"],
                 f" reasons={item.reasons}" if item.reasons else "")

    def _write_sr(self, study: ClaimedStudy, sources: list[Instance], probability: float | None,
                  positive: bool | None, revision: int, declined: list, ood_score: float | None,
                  evidence: list = ()):
        """The SR file, or None when there is nothing to say (no image that an SR can reference)."""
        from .sr import DeclinedImage, PneumoniaReport, encode_pneumonia_sr, sr_uids

        headers = [self._header(inst) for inst in sources]
        declined_images = []
        for inst, codes_, score in declined:
            header = self._header(inst)
            if all(header.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                                            "Rows", "Columns")):  # what an SR must reference an image by
                declined_images.append(DeclinedImage(header, tuple(codes_), score))
        if not headers and not declined_images:
            return None
        series_uid, instance_uid = sr_uids(study.study_uid, self.runner.info.uid, revision)
        data = encode_pneumonia_sr(PneumoniaReport(
            headers, probability, positive, self.runner.info, manufacturer=self.settings.sr.manufacturer,
            series_number=self.settings.sr.series_number, instance_number=revision, sr_series_uid=series_uid,
            sr_instance_uid=instance_uid, declined=declined_images, ood_threshold=self.runner.ood_threshold,
            ood_score=ood_score, evidence=evidence))
        path = self.spool.write_bytes(self.spool.sr_path(study.study_uid, instance_uid), data)
        return path, series_uid, instance_uid

    @staticmethod
    def _header(inst: Instance):
        from .sr import source_dataset

        # what the receiver kept of each header (rows from before that: the file's header, parsed again)
        header = source_dataset(inst.sr_attributes, inst.path)
        # a data set without them was stored under the C-STORE's Affected SOP Class/Instance
        header.SOPClassUID = header.get("SOPClassUID") or inst.sop_class_uid
        header.SOPInstanceUID = header.get("SOPInstanceUID") or inst.sop_instance_uid
        return header

    def _commit(self, concluded: list[Concluded]) -> dict[int, StudyState]:
        """Record the batch in one transaction (one fsync for all of it); returns study id -> final
        state for the studies this worker still held. A study whose lease was lost is left alone."""
        now = time.time()
        finals: dict[int, StudyState] = {}
        with self.db.write() as conn:
            for item in concluded:
                study, result = item.study, item.result
                final = studies.conclude(conn, self.owner, study, result["status"], result["revision"],
                                         result["error"], now)
                if final is None:
                    continue
                result_id = conn.scalar(select(Result.id).where(Result.study_uid == study.study_uid,
                                                                Result.model_uid == result["model_uid"]))
                if result_id is None:
                    result_id = conn.execute(insert(Result).values(created=now, **result)).inserted_primary_key[0]
                else:
                    conn.execute(update(Result).where(Result.id == result_id).values(created=now, **result))
                if result["sr_path"]:
                    outbox.enqueue(conn, result_id, study.study_uid, result["sr_sop_instance_uid"], result["sr_path"],
                                   self.settings.destinations, now, item.evidence)
                for sc in item.scored:
                    if sc.probability is None:
                        values = {"eligible": False, "reason": sc.prepared.error_reason,
                                  "detail": clip(sc.prepared.error_message or "")}
                    else:
                        values = {"probability": sc.probability, "frame": sc.prepared.frame, "ood_score": sc.ood_score}
                        if sc.in_distribution is False:  # scored, not assessed: the pixel check declined it
                            values.update(eligible=False, reason=NotAssessed.OUT_OF_DISTRIBUTION.value,
                                          detail=f"out-of-distribution score {sc.ood_score:.2f} above the "
                                                 f"threshold {sc.ood_threshold:.2f}")
                    conn.execute(update(Instance).where(Instance.id == sc.prepared.key[1]).values(**values))
                if final == StudyState.RECEIVING:
                    log.info("study %s: instances arrived while scoring; it will be scored again", study.study_uid)
                finals[study.id] = final
        return finals

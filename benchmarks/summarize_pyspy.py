#!/usr/bin/env python
"""Summarise a py-spy `--format raw` profile (collapsed stacks) per thread: where the time goes.

    python benchmarks/bench_ingest.py -n 60 --repeats 1 --receivers worker --py-spy /tmp/prof
    python benchmarks/summarize_pyspy.py /tmp/prof/worker-explicit-0.txt [--top 15] [--match worker/,dicom_io/]

For each thread (py-spy --threads puts it first in every stack): its share of samples, the share
spent idle (py-spy --idle samples in waits), and the functions with the largest inclusive share
whose file matches --match (default: the project's packages), plus the top leaf frames.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def parse(path: Path):
    threads: dict[str, Counter] = defaultdict(Counter)     # thread -> inclusive counts per function
    leaves: dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        frames = [f for f in frames[1:] if not f.startswith(("thread", "process"))] if thread != "?" else frames
        # name threads by a distinctive frame (py-spy labels them by id only)
        totals[thread] += n
        seen = set()
        for f in frames:
            m = FRAME.match(f)
            key = f"{m['func']} ({Path(m['file']).parent.name}/{Path(m['file']).name})" if m else f
            if key not in seen:
                threads[thread][key] += n
                seen.add(key)
        if frames:
            m = FRAME.match(frames[-1])
            leaves[thread][f"{m['func']} ({Path(m['file']).name}:{m['line']})" if m else frames[-1]] += n
    return threads, leaves, totals


# leaf frames where a thread blocks or sleeps (py-spy --idle samples them too)
WAIT_SITES = ("wait (threading.py", "get (queue.py", "_worker (thread.py:81)", "futures/thread.py:81)", "select (selectors.py",
              "association.py:714)", "dul.py:403)",  # the pynetdicom 3.0.x reactors' time.sleep lines
              "serve_forever (socketserver.py")


def is_wait(leaf: str) -> bool:
    return any(w in leaf for w in WAIT_SITES)


def label(thread: str, inclusive: Counter) -> str:
    if "): " in thread:      # py-spy >= 0.3.13 writes "thread (TID): NAME"
        name = thread.split("): ", 1)[1].strip()
        return re.sub(r"[-_]?\d+(_\d+)?$", "", name) or name
    names = " ".join(inclusive)
    for needle, name in (("ScorerLoop.run", "scorer"), ("OutboxLoop.run", "outbox"), ("run_reactor", "association"),
                         ("DULServiceProvider.run", "dul"), ("serve_forever", "accept"), ("_worker (thread.py)", "pool"),
                         ("run_forever", "main")):
        if needle in names:
            return name
    return "other"


STAGES = (  # (label, frame substring) - first match wins, checked from the leaf up
    ("receive: durable + SQLite (worker/receiver.py Receiver.store)", "Receiver.store (worker/receiver.py"),
    ("decode + model input (worker/scoring/prepare.py prepare)", "prepare (worker/scoring/prepare.py"),
    ("inference (worker/scoring/runner.py ModelRunner.predict)", "ModelRunner.predict (worker/scoring/runner.py"),
    ("SR build + write (worker/scorer_loop.py _write_sr)", "ScorerLoop._write_sr (worker/scorer_loop.py"),
    ("result commit (worker/scorer_loop.py _commit)", "ScorerLoop._commit (worker/scorer_loop.py"),
    ("queue polling (promote_quiet/claim_ready/reclaim)", "studies.py"),
    ("outbox: SR C-STORE (worker/outbox_loop.py deliver)", "OutboxLoop.deliver (worker/outbox_loop.py"),
    ("outbox: claim (worker/store/outbox.py claim_due)", "claim_due (worker/store/outbox.py"),
    ("pynetdicom network threads (DUL, reactor)", "pynetdicom/"),
)


def stage_table(path: Path, rate: float, studies: int | None) -> None:
    """Busy (non-waiting) samples per pipeline stage, as CPU seconds (GIL-holding or native)."""
    busy: Counter = Counter()
    total_busy = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        if not frames or is_wait(frames[-1]):
            continue
        total_busy += n
        for label, needle in STAGES:
            if any(needle in f for f in frames):
                busy[label] += n
                break
        else:
            busy["other"] += n
    print(f"\nbusy samples by stage ({total_busy / rate:.1f} thread-seconds busy in all"
          + (f", {studies} studies" if studies else "") + "):")
    for label, n in busy.most_common():
        per = f"  {1000 * n / rate / studies:7.1f} ms/study" if studies else ""
        print(f"   {100 * n / max(total_busy, 1):5.1f}%  {n / rate:7.2f} s{per}  {label}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--match", default="worker/,dicom_io/,trainer/,pynetdicom/,sqlalchemy/,highdicom/,pydicom/,torch/")
    ap.add_argument("--rate", type=float, default=200.0, help="py-spy sampling rate used (bench_ingest: 200)")
    ap.add_argument("--studies", type=int, help="studies in the profiled run (for ms/study)")
    args = ap.parse_args(argv)
    threads, leaves, totals = parse(args.profile)
    grand = sum(totals.values())
    print(f"{args.profile}: {grand} samples, {len(totals)} threads")
    groups: dict[str, list[str]] = defaultdict(list)
    for t in totals:
        groups[label(t, threads[t])].append(t)
    for name, ts in sorted(groups.items(), key=lambda kv: -sum(totals[t] for t in kv[1])):
        total = sum(totals[t] for t in ts)
        inc: Counter = Counter()
        leaf: Counter = Counter()
        for t in ts:
            inc.update(threads[t])
            leaf.update(leaves[t])
        idle = sum(v for k, v in leaf.items() if is_wait(k))
        print(f"\n[{name}] {len(ts)} thread(s), {total} samples ({100 * total / grand:.0f}% of all), "
              f"~{100 * idle / max(total, 1):.0f}% of them waiting/sleeping")
        pats = [p for p in args.match.split(",") if p]
        shown = 0
        for func, n in inc.most_common():
            if any(p.rstrip("/") + "/" in func or p.rstrip("/") + "/" in func.replace(" (", " (/") for p in pats):
                print(f"   {100 * n / total:5.1f}%  {func}")
                shown += 1
                if shown >= args.top:
                    break
        print("   top leaves (busy):")
        busy = [(k, v) for k, v in leaf.most_common() if not is_wait(k)][: max(5, args.top // 2)]
        for func, n in busy:
            print(f"   {100 * n / total:5.1f}%  {func}")
    stage_table(args.profile, args.rate, args.studies)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The chunk stream as one learn job reads it: which chunks are still to learn (the learned ones checked by
hash; a chunk moved, changed or added too late reported once and not learned), each chunk read and checked,
under ``--follow`` a chunk still being written waited for and the manifest re-read, and each task's test
split read once."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Container
from pathlib import Path

from .data.npz import sha256_of
from .data.stream import Chunk, Manifest, load_chunk, load_test, read_manifest
from .errors import EsaclError, StreamError
from .results import RunRecord

CHUNK_RETRIES = 3  # --follow: polls a chunk that does not read yet (still being written) gets before failing


class StreamReader:
    """The stream of one job, with what the job's record says it learned."""

    def __init__(self, stream_dir: Path, manifest: Manifest, record: RunRecord, follow: bool) -> None:
        self.stream_dir, self.manifest, self.record, self.follow = stream_dir, manifest, record, follow
        self.consumed = {c["chunk"]: c for c in record.consumed}
        self.reported = {(r["chunk"], r["reason"]) for r in record.reported}
        self.verified: set[str] = set()  # learned chunks whose hash was checked in this process
        self.unreadable: dict[str, int] = {}  # --follow: polls each chunk that did not read yet has waited
        self.tests: dict[int, tuple] = {}

    def report(self, rel: str, reason: str, detail: str) -> None:
        """Warn once (over resumes too) that chunk ``rel`` is not learned, and why."""
        if (rel, reason) in self.reported:
            return
        self.reported.add((rel, reason))
        self.record.reported.append({"chunk": rel, "reason": reason})
        warnings.warn(f"{self.stream_dir / rel}: {detail}", RuntimeWarning, stacklevel=2)

    def pending(self, finished: Container[int]) -> list[tuple[int, int]]:
        """Chunks not yet learned, in stream order: (task, index); ``finished`` are the tasks already ended.
        Checks the learned ones' hashes."""
        out: list[tuple[int, int]] = []
        for t, task in enumerate(self.manifest.tasks):
            if t > 0 and not any(c["task"] == t - 1 for c in self.record.consumed) and \
                    not any(pt == t - 1 for pt, _ in out):
                break  # tasks start in order: wait for the previous task's first chunk
            for i, rel in enumerate(task.chunks):
                seen = self.consumed.get(rel)
                if seen is not None:
                    if seen["task"] != t:
                        self.report(rel, "moved", f"was learned as a chunk of task {seen['task']}, the manifest "
                                    f"now lists it under task {t}; not learned again")
                    elif rel not in self.verified and \
                            (digest := sha256_of(self.manifest.path(rel))) not in (None, seen["sha256"]):
                        self.report(rel, "changed", "changed since it was learned (sha256 "
                                    f"{seen['sha256'][:12]}... then, {digest[:12]}... now); not learned again")
                elif t in finished:
                    self.report(rel, "late", f"arrived after task {t} was finished; not learned")
                else:
                    out.append((t, i))
            self.verified.update(task.chunks)
        return out

    def learned(self, chunk: Chunk) -> None:
        """Record ``chunk`` as learned."""
        rel = self.manifest.tasks[chunk.task].chunks[chunk.index]
        self.record.consumed.append({"task": chunk.task, "chunk": rel, "sha256": chunk.sha256})
        self.consumed[rel] = self.record.consumed[-1]

    def test(self, task: int) -> tuple:
        """The test split of ``task``, read once."""
        if task not in self.tests:
            self.tests[task] = load_test(self.manifest, task)
        return self.tests[task]

    def read_chunk(self, t: int, i: int, timed: Callable) -> Chunk | None:
        """Read and check chunk ``i`` of task ``t`` through ``timed``. Under --follow, a chunk that does not read
        yet (a producer may still be writing it under its final name) gives None for a few polls first."""
        rel = self.manifest.tasks[t].chunks[i]
        try:
            return timed(load_chunk, self.manifest, t, i)
        except StreamError as exc:
            waited = self.unreadable.get(rel, 0)
            if not self.follow or waited >= CHUNK_RETRIES:
                raise
            self.unreadable[rel] = waited + 1
            warnings.warn(f"{exc}; waiting for it to be complete ({waited + 1} of {CHUNK_RETRIES})",
                          RuntimeWarning, stacklevel=2)
            return None

    def refresh(self) -> None:
        """Re-read the manifest (a producer mid-update: keep the last one and wait)."""
        try:
            self.manifest = read_manifest(self.stream_dir)
        except EsaclError as exc:
            warnings.warn(f"{exc}; waiting for a valid manifest", RuntimeWarning, stacklevel=2)

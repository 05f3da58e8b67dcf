"""The chunk stream as one learn job reads it: which chunks are still to learn (the learned ones checked by
hash; a chunk moved, changed or added too late reported once and not learned), each chunk read and checked,
under ``--follow`` a chunk still being written waited for and the manifest re-read, and each task's test
split read once."""

from __future__ import annotations

import posixpath
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
        # By the name the manifest now gives each chunk (normalised), and by content.
        self.consumed = {posixpath.normpath(c["chunk"]): c for c in record.consumed}
        self.hashes = {c["sha256"]: c["chunk"] for c in record.consumed}
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
                if (rel, "duplicate") in self.reported:
                    continue
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
        self.hashes[chunk.sha256] = rel

    def duplicate(self, chunk: Chunk) -> bool:
        """Whether ``chunk`` has the bytes of a chunk already learned under another name (reported once, never
        learned)."""
        first = self.hashes.get(chunk.sha256)
        if first is None:
            return False
        rel = self.manifest.tasks[chunk.task].chunks[chunk.index]
        self.report(rel, "duplicate", f"has the same bytes as {first}, learned already; not learned again")
        return True

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


def check_moved_stream(run_dir: Path, record: RunRecord, manifest: Manifest) -> None:
    """A run resumed from another stream folder: it must be the same stream moved, every chunk learned there
    present here with the same bytes."""
    differ = []
    for chunk in record.consumed:
        path = _within(manifest, chunk["chunk"])
        if path is None or sha256_of(path) != chunk["sha256"]:
            differ.append(chunk["chunk"])
    if differ:
        raise EsaclError(f"{run_dir}: was learned from the stream {record.settings['stream']}; {manifest.root} is not "
                         f"that stream moved ({len(differ)} of the {len(record.consumed)} chunks learned are missing "
                         f"or differ here, e.g. {differ[0]}); resume with the stream it learned, or pass --overwrite "
                         "or another --run")


def _within(manifest: Manifest, rel: str) -> Path | None:
    """The file of chunk ``rel`` in ``manifest``'s folder, if the name stays inside it."""
    path = (manifest.root / rel).resolve()
    return path if path.is_relative_to(manifest.root.resolve()) else None

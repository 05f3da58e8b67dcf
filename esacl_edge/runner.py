"""The ``learn`` job: consume a chunk stream exactly once, in order, resumable; evaluate, snapshot, report."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from .data.stream import (
    Chunk,
    Manifest,
    iter_chunks,
    load_chunk,
    load_test,
    read_manifest,
    sha256_of,
)
from . import chunk_log
from .run_folder import write_run_profile
from .device.profiles import Profile, load_profile
from .errors import DivergenceError, EsaclError, StreamError
from .files import write_json
from .streaming import StreamingLearner
from .learn.methods import Method, get_method, with_lr
from .plots import RUN_PLOTS
from .reports import fixed
from .results import RunRecord, build_results
from .runlock import run_lock

CHUNK_RETRIES = 3  # --follow: polls a chunk that does not read yet (still being written) gets before failing


def default_model(input_shape: tuple[int, int, int]) -> str:
    """Reduced ResNet-18 for colour images of 32x32 and up, the small CNN otherwise."""
    h, w, c = input_shape
    return "resnet18_reduced" if c == 3 and min(h, w) >= 32 else "small_cnn"


def feed(learner: StreamingLearner, manifest: Manifest) -> Iterator[tuple[Chunk, dict]]:
    """Learn the stream in order, tasks delimited by the manifest; yield each chunk once learned."""
    for chunk in iter_chunks(manifest):
        info = learner.observe(chunk.x, chunk.y, chunk.task, chunk.n_chunks, list(manifest.tasks[chunk.task].classes))
        yield chunk, info


class _StopSignals:
    """SIGINT/SIGTERM ask the job to stop after the current chunk; a second one aborts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nesacl-edge: {signal.Signals(signum).name}: finishing the current chunk, then saving "
              "(send it again to abort; the last saved state is kept)", file=sys.stderr, flush=True)

    def wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.signal is None and time.monotonic() < end:
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))


class _Job:
    """One ``learn`` job over a run folder: resumes from its saved state, saves after every chunk."""

    def __init__(self, stream_dir: Path, run_dir: Path, manifest: Manifest, learner: StreamingLearner,
                 record: RunRecord, overwrite: bool, follow: bool, anytime: bool) -> None:
        self.stream_dir, self.run_dir, self.manifest = stream_dir, run_dir, manifest
        self.learner, self.record = learner, record
        learner.on_task_end.append(self.task_ended)
        self.overwrite, self.follow, self.anytime = overwrite, follow, anytime
        self.tests: dict[int, tuple] = {}
        self.consumed = {c["chunk"]: c for c in record.consumed}
        self.reported = {(r["chunk"], r["reason"]) for r in record.reported}
        self.verified: set[str] = set()  # learned chunks whose hash was checked in this process
        self.touched = False
        self.untimed = 0.0  # seconds task_ended spent inside the timed block
        self.resumed_at = len(record.consumed)
        self.unreadable: dict[str, int] = {}  # --follow: polls each chunk that did not read yet has waited
        self.log = run_dir / chunk_log.FILE_NAME

    # -------------------------------------------------------------- the run folder
    def _touch(self) -> None:
        """Create (or, with --overwrite, clear) the run folder: only once there is something to write."""
        if self.touched:
            return
        try:
            if self.overwrite:
                for name in ("snapshots", "state"):
                    if (self.run_dir / name).exists():
                        shutil.rmtree(self.run_dir / name)
                for name in ("results.json", chunk_log.FILE_NAME, *RUN_PLOTS):
                    (self.run_dir / name).unlink(missing_ok=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            chunk_log.trim(self.log, self.resumed_at)
            write_run_profile(self.run_dir, self.learner.profile)  # export's default profile
        except OSError as exc:
            raise EsaclError(f"{self.run_dir}: cannot write the run folder ({exc.strerror or exc})") from None
        self.touched = True

    def write(self, what: str, fn, *args) -> None:
        self._touch()
        try:
            fn(*args)
        except OSError as exc:
            raise EsaclError(f"{self.run_dir}: cannot write {what} ({exc.strerror or exc})") from None

    def save(self, line: dict | None = None) -> None:
        """Append a learned chunk's ``line`` to the chunk log, then save the learner's state (a line whose
        state a crash lost is dropped on resume: see ``chunk_log.trim``)."""
        self._touch()
        size = self.log.stat().st_size if self.log.exists() else 0
        if line is not None:
            self.write("the chunk log", chunk_log.append, self.log, line)
        try:
            self.learner.save_state(self.run_dir, asdict(self.record))
        except BaseException:
            with contextlib.suppress(OSError):  # leave the log as the last saved state knows it
                os.truncate(self.log, size)
            raise

    def write_plots(self, results: dict) -> None:
        """The run's accuracy-matrix and sparsity plots (a plotting failure only warns: the results stand)."""
        try:
            from .plots import write_run_plots

            write_run_plots(results, self.run_dir)
        except Exception as exc:  # matplotlib raises many types; the run itself is done
            warnings.warn(f"{self.run_dir}: plots not written ({exc})", RuntimeWarning, stacklevel=2)

    # -------------------------------------------------------------- the stream
    def report(self, rel: str, reason: str, detail: str) -> None:
        if (rel, reason) in self.reported:
            return
        self.reported.add((rel, reason))
        self.record.reported.append({"chunk": rel, "reason": reason})
        warnings.warn(f"{self.stream_dir / rel}: {detail}", RuntimeWarning, stacklevel=2)

    def pending(self, manifest: Manifest) -> list[tuple[int, int]]:
        """Chunks not yet learned, in stream order: (task, index). Checks the learned ones' hashes."""
        learner, out = self.learner, []
        for t, task in enumerate(manifest.tasks):
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
                            (digest := sha256_of(manifest.path(rel))) not in (None, seen["sha256"]):
                        self.report(rel, "changed", "changed since it was learned (sha256 "
                                    f"{seen['sha256'][:12]}... then, {digest[:12]}... now); not learned again")
                elif t in learner.snapshots:
                    self.report(rel, "late", f"arrived after task {t} was finished; not learned")
                else:
                    out.append((t, i))
            self.verified.update(task.chunks)
        return out

    def test(self, manifest: Manifest, task: int) -> tuple:
        if task not in self.tests:
            self.tests[task] = load_test(manifest, task)
        return self.tests[task]

    # -------------------------------------------------------------- learning
    def task_ended(self, task: int) -> None:
        """The learner finished ``task``: evaluate every task so far, write the task's snapshot (untimed)."""
        start, learner = time.perf_counter(), self.learner
        row = [learner.evaluate(*self.test(self.manifest, j), task=j) if self.manifest.tasks[j].test else None
               for j in range(task + 1)]
        self.record.acc_c.append([r and r["class_il"] for r in row])
        self.record.acc_t.append([r and r["task_il"] for r in row])
        self.write("the task snapshot", learner.write_snapshot, self.run_dir, task,
                   {"pattern": self.record.settings["pattern"], "stream": self.record.settings["stream"],
                    "profile": learner.profile.name})
        self.untimed += time.perf_counter() - start

    def timed(self, fn, *args):
        """Run ``fn`` and add its time to ``train_seconds``, less what ``task_ended`` spent evaluating and writing."""
        start, self.untimed = time.perf_counter(), 0.0
        out = fn(*args)
        self.record.train_seconds += time.perf_counter() - start - self.untimed
        return out

    def read_chunk(self, t: int, i: int) -> Chunk | None:
        """Read and check chunk ``i`` of task ``t`` (timed). Under --follow, a chunk that does not read yet
        (a producer may still be writing it under its final name) gives None for a few polls first."""
        rel = self.manifest.tasks[t].chunks[i]
        try:
            return self.timed(load_chunk, self.manifest, t, i)
        except StreamError as exc:
            waited = self.unreadable.get(rel, 0)
            if not self.follow or waited >= CHUNK_RETRIES:
                raise
            self.unreadable[rel] = waited + 1
            warnings.warn(f"{exc}; waiting for it to be complete ({waited + 1} of {CHUNK_RETRIES})",
                          RuntimeWarning, stacklevel=2)
            return None

    def diverged(self, exc: DivergenceError, where: Path) -> DivergenceError:
        """The learner's divergence as the job reports it: where, and what is kept."""
        kept = (f"{self.run_dir / 'state'} keeps the state from before it" if self.record.consumed
                else "nothing was saved")
        return DivergenceError(f"{where}: {exc.reason}; {kept}: fix the cause, then run with --overwrite")

    def learn_chunk(self, chunk: Chunk, read_seconds: float) -> dict:
        """Learn a chunk that was read; returns its line of the chunk log."""
        learner, task = self.learner, self.manifest.tasks[chunk.task]
        known = not self.follow or task.complete
        rel = task.chunks[chunk.index]
        # The learner's task driver ends the open task on a new task's chunk, and a task of known
        # length after its last chunk; each end calls task_ended.
        before = self.record.train_seconds
        try:
            info = self.timed(learner.observe, chunk.x, chunk.y, chunk.task, len(task.chunks) if known else None,
                              list(task.classes))
        except DivergenceError as exc:
            raise self.diverged(exc, chunk.path) from None
        self.record.samples_learned += len(chunk.y)
        self.record.consumed.append({"task": chunk.task, "chunk": rel, "sha256": chunk.sha256})
        self.consumed[rel] = self.record.consumed[-1]
        seconds = self.record.train_seconds - before + read_seconds
        line = {"chunk": len(self.record.consumed) - 1, "task": chunk.task, "file": rel, "samples": len(chunk.y),
                "loss": info["loss"] if math.isfinite(info["loss"]) else None, "density": info["density"],
                "seconds": seconds, "samples_per_second": len(chunk.y) / seconds if seconds > 0 else None}
        if self.anytime:
            seen = [learner.evaluate(*self.test(self.manifest, j), task=j)["class_il"]
                    for j in range(chunk.task + 1) if self.manifest.tasks[j].test]
            self.record.anytime_c.append(sum(seen) / len(seen) if seen else None)
            line["anytime_acc_class_il"] = self.record.anytime_c[-1]
        return line

    def end_task(self) -> None:
        """End the open task (timed) and save."""
        try:
            self.timed(self.learner.end_task)
        except DivergenceError as exc:
            raise self.diverged(exc, self.stream_dir / "manifest.json") from None
        self.save()

    def task_over(self, manifest: Manifest) -> bool:
        """Whether the open task can get no more chunks."""
        t = self.learner.progress.task
        return t >= 0 and (not self.follow or manifest.tasks[t].complete)

    def learn_pending(self, bar: tqdm, stop: _StopSignals) -> bool:
        """Learn the chunks that are there, saving after each; False when one did not read yet (--follow)."""
        for t, i in self.pending(self.manifest):
            before = self.record.train_seconds
            chunk = self.read_chunk(t, i)
            if chunk is None:
                return False
            line = self.learn_chunk(chunk, self.record.train_seconds - before)
            self.save(line)
            bar.update(1)
            bar.set_postfix(task=t, loss="n/a" if line["loss"] is None else f"{line['loss']:.3f}",
                            density=fixed(self.learner.density, 3))
            if stop.signal is not None:
                break
        return True

    def loop(self, bar: tqdm, stop: _StopSignals, poll_seconds: float, max_idle: float | None) -> None:
        """Learn the stream; with --follow keep looking for new chunks until stopped or idle too long."""
        idle_since, consumed = time.monotonic(), len(self.record.consumed)
        while stop.signal is None:
            complete = self.learn_pending(bar, stop)
            if stop.signal is not None:
                break
            if complete and self.task_over(self.manifest):
                self.end_task()
            if not self.follow:
                break
            if len(self.record.consumed) > consumed or not complete:  # waiting for a chunk is not idle
                idle_since, consumed = time.monotonic(), len(self.record.consumed)
            elif max_idle is not None and time.monotonic() - idle_since >= max_idle:
                self.follow = False  # the stream has ended: close the open task
                continue
            stop.wait(poll_seconds)
            try:
                self.manifest = read_manifest(self.stream_dir)
            except EsaclError as exc:  # a producer mid-update; keep waiting
                warnings.warn(f"{exc}; waiting for a valid manifest", RuntimeWarning, stacklevel=2)
            bar.total = sum(len(t.chunks) for t in self.manifest.tasks)


def _settings_differ(saved: dict, now: dict) -> str:
    """The settings a resumed run must share (the stream may have moved: its chunks are checked by hash).

    A setting the saved run does not record (it predates it) is not compared."""
    return ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in now
                     if k != "stream" and k in saved and saved[k] != now[k])


def _waiting_task(manifest: Manifest, record: RunRecord) -> int | None:
    """The first task that has no chunk yet while the tasks after it cannot start (an empty chunk_dir)."""
    learned = {c["task"] for c in record.consumed}
    for t, task in enumerate(manifest.tasks):
        if not task.chunks and t not in learned:
            return t
    return None


def learn(stream_dir: str | Path, profile: str | Path | Profile = "cpu", run_dir: str | Path = "esacl-run",
          method: str | Method = "esacl", sparsity: float | None = None, seed: int = 0, model: str | None = None,
          buffer_bytes: int | None = None, overwrite: bool = False, progress: bool = True,
          anytime: bool = False, pattern: str | None = None, follow: bool = False, poll_seconds: float = 5.0,
          max_idle: float | None = None, lr: float | None = None, init: str | Path | None = None,
          freeze_until: str | None = None, latent_replay: str | None = None) -> dict:
    """Learn the stream chunk by chunk; write per-task snapshots and ``results.json`` to ``run_dir``.

    The learner's state is saved in ``run_dir/state`` after every chunk. On a run folder
    that holds saved state, the job resumes and learns each remaining chunk exactly once.
    SIGINT/SIGTERM stop it after the current chunk (``results["stopped_by"]``). With
    ``follow``, it waits for new chunks (polling every ``poll_seconds``) until stopped or
    until ``max_idle`` seconds pass without one. With ``anytime``, it also evaluates on every
    task seen so far after every chunk. ``lr`` overrides the method's learning rate. ``init``,
    ``freeze_until`` and ``latent_replay`` are the :class:`StreamingLearner`'s.

    One chunk's numbers are appended to ``run_dir/metrics.jsonl`` as it is saved; the accuracy
    matrix and sparsity plots are written at the end. A second job on the same ``run_dir`` is
    refused while this one runs (an OS lock, see ``runlock.py``).
    """
    stream_dir, run_dir = Path(stream_dir), Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise EsaclError(f"{run_dir}: is a file, not a run folder")
    if not poll_seconds > 0:
        raise EsaclError(f"--poll must be a number of seconds > 0, got {poll_seconds}")
    if max_idle is not None and not max_idle >= 0:
        raise EsaclError(f"--max-idle must be a number of seconds >= 0, got {max_idle}")
    if lr is not None and not lr > 0:
        raise EsaclError(f"--lr must be > 0, got {lr}")
    manifest = read_manifest(stream_dir)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    if lr is not None:
        method = with_lr(get_method(method) if isinstance(method, str) else method, lr)
    # The learner checks the profile's budgets, so a run that cannot fit stops before touching run_dir.
    learner = StreamingLearner(model or default_model(manifest.input_shape), prof, manifest.num_classes,
                               manifest.input_shape, method=method, sparsity=sparsity, buffer_bytes=buffer_bytes,
                               input_dtype=manifest.dtype, normalization=manifest.normalization, seed=seed,
                               class_names=list(manifest.class_names) if manifest.class_names else None,
                               pattern=pattern, init=init, freeze_until=freeze_until, latent_replay=latent_replay)
    settings = {"stream": str(stream_dir.resolve()), "stream_name": manifest.name, "method": learner.method.name,
                "model": learner.spec.model, "seed": seed, "sparsity": sparsity, "buffer_bytes": buffer_bytes,
                "pattern": pattern, "profile": prof.name, "anytime": anytime, "device": prof.device,
                "precision": prof.precision,
                "passes": prof.passes_per_chunk, "batch_size": prof.batch_size, "lr": lr,
                "init": None if init is None else str(Path(init).resolve()), "freeze_until": freeze_until,
                "latent_replay": latent_replay}
    record = RunRecord(settings)

    def same_job(saved: dict) -> None:
        nonlocal record
        try:
            record = RunRecord(**saved)
        except TypeError:
            raise EsaclError(f"{run_dir / 'state'}: the saved run record is incomplete") from None
        if diff := _settings_differ(record.settings, settings):
            raise EsaclError(f"{run_dir}: holds a run with other settings ({diff}); resume with the same "
                             "settings, or pass --overwrite or another --run")
        # A run saved before a setting was recorded adopts this job's, and later resumes must repeat it.
        record.settings = {**settings, **record.settings, "stream": settings["stream"]}

    with run_lock(run_dir):
        if overwrite or not learner.load_state(run_dir, same_job):
            if not overwrite and ((run_dir / "results.json").exists() or (run_dir / "snapshots").exists()):
                raise EsaclError(f"{run_dir}: already holds a run without saved state; pass --overwrite or choose "
                                 "another --run")
        if not follow:
            for t, task in enumerate(manifest.tasks):  # fail early on a bad test split
                if task.test:
                    load_test(manifest, t)
        job = _Job(stream_dir, run_dir, manifest, learner, record, overwrite, follow, anytime)
        with tqdm(total=sum(len(t.chunks) for t in manifest.tasks), initial=len(record.consumed), desc="learn",
                  unit="chunk", disable=not progress) as bar, _StopSignals() as stop:
            job.loop(bar, stop, poll_seconds, max_idle)
        if stop.signal is None and (waiting := _waiting_task(job.manifest, job.record)) is not None:
            warnings.warn(f"{stream_dir}: task {waiting} has no chunks yet (its chunk_dir is empty), so the stream "
                          f"stops there; run the same command again (or with --follow) once they arrive",
                          RuntimeWarning, stacklevel=2)
        results = build_results(job.learner, job.record, job.manifest, prof, stop.signal, job.resumed_at)
        job.write("results.json", write_json, run_dir / "results.json", results)
        job.write_plots(results)
    return results

"""The ``learn`` job: consume a chunk stream exactly once, in order, resumable; evaluate, snapshot, report."""

from __future__ import annotations

import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
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
from .deploy.snapshot import write_run_profile
from .device.profiles import Profile, load_profile
from .errors import EsaclError
from .files import write_json
from .learn.learner import StreamingLearner
from .learn.methods import Method
from .results import build_results


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


@dataclass
class RunRecord:
    """What the job adds to the learner's state: settings, chunks consumed (with hashes), accuracies."""

    settings: dict
    consumed: list[dict] = field(default_factory=list)
    acc_c: list[list[float]] = field(default_factory=list)
    acc_t: list[list[float]] = field(default_factory=list)
    anytime_c: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    samples_learned: int = 0  # chunk samples consumed (each once, whatever the passes)
    reported: list[dict] = field(default_factory=list)  # chunks changed after learning, or added too late


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

    # -------------------------------------------------------------- the run folder
    def _touch(self) -> None:
        """Create (or, with --overwrite, clear) the run folder: only once there is something to write."""
        if self.touched:
            return
        if self.overwrite:
            for name in ("snapshots", "state"):
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            (self.run_dir / "results.json").unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_run_profile(self.run_dir, self.learner.profile)  # export's default profile
        self.touched = True

    def write(self, what: str, fn, *args) -> None:
        self._touch()
        try:
            fn(*args)
        except OSError as exc:
            raise EsaclError(f"{self.run_dir}: cannot write {what} ({exc.strerror or exc})") from None

    def save(self) -> None:
        self._touch()
        self.learner.save_state(self.run_dir, asdict(self.record))

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
        row = [learner.evaluate(*self.test(self.manifest, j), task=j) for j in range(task + 1)]
        self.record.acc_c.append([r["class_il"] for r in row])
        self.record.acc_t.append([r["task_il"] for r in row])
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

    def learn_chunk(self, t: int, i: int) -> dict:
        learner, task = self.learner, self.manifest.tasks[t]
        known = not self.follow or task.complete

        def read_and_learn() -> tuple:  # train time includes reading and validating the chunk
            chunk = load_chunk(self.manifest, t, i)
            # The learner's task driver ends the open task on a new task's chunk, and a task of known
            # length after its last chunk; each end calls task_ended.
            return chunk, learner.observe(chunk.x, chunk.y, t, len(task.chunks) if known else None,
                                          list(task.classes))

        chunk, info = self.timed(read_and_learn)
        self.record.samples_learned += len(chunk.y)
        self.record.consumed.append({"task": t, "chunk": task.chunks[i], "sha256": chunk.sha256})
        self.consumed[task.chunks[i]] = self.record.consumed[-1]
        if self.anytime:
            seen = [learner.evaluate(*self.test(self.manifest, j), task=j)["class_il"] for j in range(t + 1)]
            self.record.anytime_c.append(sum(seen) / len(seen))
        return info

    def task_over(self, manifest: Manifest) -> bool:
        """Whether the open task can get no more chunks."""
        t = self.learner.progress.task
        return t >= 0 and (not self.follow or manifest.tasks[t].complete)


def _settings_differ(saved: dict, now: dict) -> str:
    """The settings a resumed run must share (the stream may have moved: its chunks are checked by hash)."""
    return ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in now
                     if k != "stream" and saved.get(k) != now.get(k))


def learn(stream_dir: str | Path, profile: str | Path | Profile = "cpu", run_dir: str | Path = "esacl-run",
          method: str | Method = "esacl", sparsity: float | None = None, seed: int = 0, model: str | None = None,
          buffer_bytes: int | None = None, overwrite: bool = False, progress: bool = True,
          anytime: bool = False, pattern: str | None = None, follow: bool = False, poll_seconds: float = 5.0,
          max_idle: float | None = None) -> dict:
    """Learn the stream chunk by chunk; write per-task snapshots and ``results.json`` to ``run_dir``.

    The learner's state is saved in ``run_dir/state`` after every chunk. On a run folder
    that holds saved state, the job resumes and learns each remaining chunk exactly once.
    SIGINT/SIGTERM stop it after the current chunk (``results["stopped_by"]``). With
    ``follow``, it waits for new chunks (polling every ``poll_seconds``) until stopped or
    until ``max_idle`` seconds pass without one. With ``anytime``, it also evaluates on every
    task seen so far after every chunk.
    """
    stream_dir, run_dir = Path(stream_dir), Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise EsaclError(f"{run_dir}: is a file, not a run folder")
    manifest = read_manifest(stream_dir)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    # The learner checks the profile's budgets, so a run that cannot fit stops before touching run_dir.
    learner = StreamingLearner(model or default_model(manifest.input_shape), prof, manifest.num_classes,
                               manifest.input_shape, method=method, sparsity=sparsity, buffer_bytes=buffer_bytes,
                               input_dtype=manifest.dtype, normalization=manifest.normalization, seed=seed,
                               class_names=list(manifest.class_names) if manifest.class_names else None,
                               pattern=pattern)
    settings = {"stream": str(stream_dir.resolve()), "stream_name": manifest.name, "method": learner.method.name,
                "model": learner.spec.model, "seed": seed, "sparsity": sparsity, "buffer_bytes": buffer_bytes,
                "pattern": pattern, "profile": prof.name, "anytime": anytime}
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
        record.settings["stream"] = settings["stream"]

    if overwrite or not learner.load_state(run_dir, same_job):
        if not overwrite and ((run_dir / "results.json").exists() or (run_dir / "snapshots").exists()):
            raise EsaclError(f"{run_dir}: already holds a run without saved state; pass --overwrite or choose "
                             "another --run")
    if not follow:
        for t in range(len(manifest.tasks)):  # fail early on a bad test split
            load_test(manifest, t)
    job = _Job(stream_dir, run_dir, manifest, learner, record, overwrite, follow, anytime)
    bar = tqdm(total=sum(len(t.chunks) for t in manifest.tasks), initial=len(record.consumed), desc="learn",
               unit="chunk", disable=not progress)
    idle_since = time.monotonic()
    with _StopSignals() as stop:
        while stop.signal is None:
            todo = job.pending(manifest)
            for t, i in todo:
                info = job.learn_chunk(t, i)
                job.save()
                bar.update(1)
                bar.set_postfix(task=t, loss=f"{info['loss']:.3f}", density=f"{learner.density:.3f}")
                if stop.signal is not None:
                    break
            if stop.signal is not None:
                break
            if job.task_over(manifest):
                job.timed(learner.end_task)
                job.save()
            if not follow:
                break
            if todo:
                idle_since = time.monotonic()
            elif max_idle is not None and time.monotonic() - idle_since >= max_idle:
                follow = job.follow = False  # the stream has ended: close the open task
                continue
            stop.wait(poll_seconds)
            try:
                manifest = job.manifest = read_manifest(stream_dir)
            except EsaclError as exc:  # a producer mid-update; keep waiting
                warnings.warn(f"{exc}; waiting for a valid manifest", RuntimeWarning, stacklevel=2)
            bar.total = sum(len(t.chunks) for t in manifest.tasks)
    bar.close()
    results = build_results(job.learner, job.record, manifest, prof, stop.signal, job.resumed_at)
    job.write("results.json", write_json, run_dir / "results.json", results)
    return results

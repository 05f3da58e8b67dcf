"""The ``learn`` job: consume a chunk stream exactly once, in order, resumable; evaluate, snapshot, report."""

from __future__ import annotations

import math
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
    load_test,
    read_manifest,
)
from .run_folder import RunFolder
from .stream_reader import StreamReader, check_moved_stream
from .device.profiles import Profile, load_profile
from .errors import DivergenceError, EsaclError
from .files import write_json
from .streaming import StreamingLearner
from .learn.methods import Method, get_method, with_lr
from .reports import fixed
from .results import RunRecord, build_results
from .runlock import run_lock

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
        self.stream_dir, self.run_dir = stream_dir, run_dir
        self.learner, self.record, self.anytime = learner, record, anytime
        learner.on_task_end.append(self.task_ended)
        self.stream = StreamReader(stream_dir, manifest, record, follow)
        self.resumed_at = len(record.consumed)
        self.folder = RunFolder(run_dir, overwrite, self.resumed_at, learner.profile)
        self.untimed = 0.0  # seconds task_ended spent inside the timed block

    def save(self, line: dict | None = None) -> None:
        self.folder.save(self.learner, asdict(self.record), line)

    def evaluate(self, task: int) -> list[dict | None]:
        """Accuracy on the test split of every task up to ``task`` (None where a task has none)."""
        tasks = self.stream.manifest.tasks
        return [self.learner.evaluate(*self.stream.test(j), task=j) if tasks[j].test else None
                for j in range(task + 1)]

    def task_ended(self, task: int) -> None:
        """The learner finished ``task``: evaluate every task so far, write the task's snapshot (untimed)."""
        start, learner = time.perf_counter(), self.learner
        row = self.evaluate(task)
        self.record.acc_c.append([r and r["class_il"] for r in row])
        self.record.acc_t.append([r and r["task_il"] for r in row])
        self.folder.write("the task snapshot", learner.write_snapshot, self.run_dir, task,
                          {"pattern": self.record.settings["pattern"], "stream": self.record.settings["stream"],
                           "profile": learner.profile.name})
        self.untimed += time.perf_counter() - start

    def timed(self, fn, *args):
        """Run ``fn`` and add its time to ``train_seconds``, less what ``task_ended`` spent evaluating and writing."""
        start, self.untimed = time.perf_counter(), 0.0
        out = fn(*args)
        self.record.train_seconds += time.perf_counter() - start - self.untimed
        return out

    def diverged(self, exc: DivergenceError, where: Path) -> DivergenceError:
        """The learner's divergence as the job reports it: where, and what is kept."""
        if self.record.consumed:
            return DivergenceError(f"{where}: {exc.reason}; {self.run_dir / 'state'} keeps the state from before it: "
                                   "fix the cause, then run with --overwrite")
        return DivergenceError(f"{where}: {exc.reason}; nothing was saved: fix the cause (a lower --lr, say), then "
                               "run the command again")

    def learn_chunk(self, chunk: Chunk, read_seconds: float) -> dict:
        """Learn a chunk that was read; returns its line of the chunk log."""
        learner, task = self.learner, self.stream.manifest.tasks[chunk.task]
        known = not self.stream.follow or task.complete
        # The learner's task driver ends the open task on a new task's chunk, and a task of known
        # length after its last chunk; each end calls task_ended.
        before = self.record.train_seconds
        try:
            info = self.timed(learner.observe, chunk.x, chunk.y, chunk.task, len(task.chunks) if known else None,
                              list(task.classes))
        except DivergenceError as exc:
            raise self.diverged(exc, chunk.path) from None
        self.record.samples_learned += len(chunk.y)
        self.stream.learned(chunk)
        seconds = self.record.train_seconds - before + read_seconds
        line = {"chunk": len(self.record.consumed) - 1, "task": chunk.task, "file": task.chunks[chunk.index],
                "samples": len(chunk.y), "loss": info["loss"] if math.isfinite(info["loss"]) else None,
                "density": info["density"], "seconds": seconds,
                "samples_per_second": len(chunk.y) / seconds if seconds > 0 else None}
        if self.anytime:
            seen = [r["class_il"] for r in self.evaluate(chunk.task) if r is not None]
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

    def task_over(self) -> bool:
        """Whether the open task can get no more chunks."""
        t = self.learner.progress.task
        return t >= 0 and (not self.stream.follow or self.stream.manifest.tasks[t].complete)

    def learn_pending(self, bar: tqdm, stop: _StopSignals) -> bool:
        """Learn the chunks that are there, saving after each; False when one did not read yet (--follow)."""
        for t, i in self.stream.pending(self.learner.snapshots):
            before = self.record.train_seconds
            chunk = self.stream.read_chunk(t, i, self.timed)
            if chunk is None:
                return False
            if self.stream.duplicate(chunk):
                bar.update(1)
                continue
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
            if complete and self.task_over():
                self.end_task()
            if not self.stream.follow:
                break
            if len(self.record.consumed) > consumed or not complete:  # waiting for a chunk is not idle
                idle_since, consumed = time.monotonic(), len(self.record.consumed)
            elif max_idle is not None and time.monotonic() - idle_since >= max_idle:
                self.stream.follow = False  # the stream has ended: close the open task
                continue
            stop.wait(poll_seconds)
            self.stream.refresh()
            bar.total = sum(len(t.chunks) for t in self.stream.manifest.tasks)


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
        if record.settings.get("stream") not in (None, settings["stream"]):
            check_moved_stream(run_dir, record, manifest)
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
        if stop.signal is None and (waiting := _waiting_task(job.stream.manifest, job.record)) is not None:
            warnings.warn(f"{stream_dir}: task {waiting} has no chunks yet (its chunk_dir is empty), so the stream "
                          f"stops there; run the same command again (or with --follow) once they arrive",
                          RuntimeWarning, stacklevel=2)
        results = build_results(job.learner, job.record, job.stream.manifest, prof, stop.signal, job.resumed_at)
        job.folder.write("results.json", write_json, run_dir / "results.json", results)
        job.folder.write_plots(results)
    return results

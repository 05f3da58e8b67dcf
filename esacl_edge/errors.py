"""The one error type users see: a message that names the file (or field) and what is wrong."""


class EsaclError(Exception):
    """Bad input or state; the CLI prints the message on one line and exits with status 2."""


class StreamError(EsaclError):
    """A chunk stream (manifest or chunk file) is missing, malformed or inconsistent."""


class ProfileError(EsaclError):
    """A device profile cannot be found or does not validate."""


class SnapshotError(EsaclError):
    """A run directory or task snapshot is missing or does not match the model."""


class ExportError(EsaclError):
    """ONNX export failed or the exported file disagrees with PyTorch."""


class CheckpointError(EsaclError):
    """Saved learner state cannot be written, read, or does not match this run."""


class CheckpointVersionError(CheckpointError):
    """Saved learner state of a schema this version does not read (no earlier checkpoint is tried)."""


class DivergenceError(EsaclError):
    """Training diverged (a non-finite or exploding loss, or non-finite weights): the model is unusable.

    ``reason`` says what happened without the advice for API users, for callers that give their own."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message

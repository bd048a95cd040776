"""User-facing failures: one family per kind, caught once in the CLI and printed as one line."""


class PdropError(Exception):
    """Base class of every error the CLI reports as a single line."""


class CheckpointError(PdropError):
    """The source checkpoint is missing, corrupt or of an unsupported architecture."""


class ConfigError(PdropError):
    """An inconsistent build setting: drop ratio, stage layers, dtype or limits."""


class EngineError(PdropError):
    """An engine directory that is missing, from another format version, or corrupt."""


class InputError(PdropError):
    """A bad request: unreadable image, too-long prompt, bad sampling parameter."""


class ExportError(PdropError):
    """A TensorRT deployment artifact that cannot be made: missing packages, a failed check, no backend."""


def first_line(error: BaseException) -> str:
    """An exception's message up to its first line break ("" if it has none): torch's and CUDA's
    messages go on for lines, and a failed request gets one."""
    return (str(error).strip().splitlines() or [""])[0]

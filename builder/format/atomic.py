"""Directories that appear whole or not at all: staged beside the target, renamed into place."""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError


@contextmanager
def staging_dir(output: Path, force: bool):
    """Yield a temp dir next to `output`; on success it replaces `output`, on any failure it vanishes."""
    if output.exists() and not force:
        raise ConfigError(f"output {output} exists; pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=output.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an engine is meant to be shared

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield tmp
        if output.exists():
            old = output.with_name(f".{output.name}.old-{tmp.name}")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def remove_stale(output: Path) -> None:
    """Remove what killed builds of `output` left beside it (their staging and replaced directories
    carry the builder's pid); those of a build still running stay."""
    for kind in ("partial", f"old-.{output.name}.partial"):
        for leftover in output.parent.glob(f".{output.name}.{kind}-*"):
            pid = leftover.name[len(f".{output.name}.{kind}-"):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True

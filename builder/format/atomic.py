"""Directories that appear whole or not at all: staged beside the target, renamed into place."""
from __future__ import annotations

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
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
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

"""The run directory for the length of a run: checked, locked, its settings recorded, and left as it was
found when the run fails before it starts training.

A run's resolved settings (config.yaml) are its identity: `--resume` continues a run only with the same
settings (except where files go and how often it reports), so a resumed run is the run it claims to be.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from comoe.files import atomic_write_text
from comoe.settings import settings_from_dict
from comoe.training.distributed import World
from comoe.training.settings import TrainArgs

logger = logging.getLogger(__name__)

SETTINGS_NAME = "config.yaml"
LOCK_NAME = ".lock"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive flock on <run>/.lock holding the owner's pid. The kernel drops the lock when its process
    dies, so a lock file left by a killed run is taken over (with a message), never waited for."""

    def __init__(self, run: Path) -> None:
        self.path = run / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise FileExistsError(
                f"--output {self.path.parent} is in use by another comoe process (pid {self._holder()}); "
                "wait for it to finish or pick another folder"
            ) from None
        previous = self._holder()
        if previous is not None and previous != os.getpid():
            state = "no longer running" if not _pid_running(previous) else "not holding it"
            logger.warning(f"taking over the lock of {self.path.parent} left by pid {previous} ({state})")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def settings_differences(saved: dict[str, Any], args: TrainArgs) -> list[str]:
    """'field: saved -> given' for every setting that would change what the run computes."""
    previous = dataclasses.asdict(settings_from_dict(TrainArgs, saved, where=SETTINGS_NAME))
    given = dataclasses.asdict(args)
    return [
        f"{name}: {previous[name]!r} -> {given[name]!r}"
        for name in given
        if name not in TrainArgs.RESUMABLE_CHANGES and previous[name] != given[name]
    ]


class RunDirectory:
    """Use as `with RunDirectory(args, world) as run:`; call `run.record_settings()` once the model and the
    data have loaded. Only the main process touches the folder; the others wait at the barriers."""

    def __init__(self, args: TrainArgs, world: World) -> None:
        self.args = args
        self.world = world
        self.path = Path(args.output)
        self.lock = RunLock(self.path)
        self.created = False
        self.recorded = False

    def __enter__(self) -> RunDirectory:
        if self.world.is_main:
            if self.path.exists() and not self.path.is_dir():
                raise FileExistsError(f"--output {self.path} is a file, not a folder")
            if not self.path.exists():
                self.path.mkdir(parents=True)
                self.created = True
            try:
                self.lock.acquire()  # first, so a second process learns that the folder is in use
                self._check_content()
                self._check_resume()
            except BaseException:
                self._restore()
                raise
        self.world.barrier()
        return self

    def _check_content(self) -> None:
        content = [p for p in self.path.iterdir() if p.name != LOCK_NAME]
        if content and not self.args.resume:
            raise FileExistsError(
                f"--output {self.path} is not empty: pass --resume to continue it, or pick a new folder"
            )

    def _check_resume(self) -> None:
        settings = self.path / SETTINGS_NAME
        if not (self.args.resume and settings.is_file()):
            return
        try:
            saved = yaml.safe_load(settings.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ValueError(f"{settings}: unreadable ({str(error).splitlines()[0]})") from None
        if not isinstance(saved, dict):
            raise ValueError(f"{settings}: expected the mapping of settings a run writes")
        differences = settings_differences(saved, self.args)
        if differences:
            raise ValueError(
                f"--resume: settings differ from {settings} (saved -> given): {'; '.join(differences)}. "
                "Resume with the saved settings, or start a new run in another --output"
            )

    def record_settings(self) -> None:
        """Write config.yaml: the resolved settings, after every start-up check has passed."""
        if self.world.is_main:
            text = yaml.safe_dump(dataclasses.asdict(self.args), sort_keys=False)
            atomic_write_text(self.path / SETTINGS_NAME, text)
        self.recorded = True

    def _restore(self) -> None:
        """Release the lock; a folder this run created and that holds nothing of it is removed again."""
        self.lock.release()
        if self.created and not self.recorded:
            shutil.rmtree(self.path, ignore_errors=True)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.world.is_main:
            self._restore()


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows after the checkpoint a run resumes from, so the log reads as one uninterrupted run."""
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))

"""The results file: append-only JSON lines, one per finished item, durable line by line, resumable by id.

Both the single-machine and the Ray path write through a :class:`ResultStore`, from one process (the
driver), so an id is written at most once: :meth:`ResultStore.append` refuses an id the file already holds.
Each line is flushed and ``fsync``-ed before ``append`` returns, so a crash or a kill loses at most the line
being written; a torn last line (no newline, not a whole result) is cut off when the file is opened again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from pathlib import Path
from types import TracebackType
from typing import IO

from .._errors import ConfigError
from ._items import ItemResult

__all__ = ["ResultStore"]


def _is_result(line: bytes) -> bool:
    try:
        ItemResult.from_json(json.loads(line))
    except (ValueError, ConfigError):
        return False
    return True


class ResultStore:
    """An append-only JSON-lines results file, locked for one writer.

    Args:
        path: the file; created (with its folder) when missing.

    Attributes:
        finished: id -> the result the file holds for it (results of earlier runs included).

    Raises:
        ConfigError: the file cannot be opened, another process holds it (a batch is already writing it), or a
            line other than a torn last one is not a result (the message names the line).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.finished: dict[str, ItemResult] = {}
        self._lock = threading.Lock()  # append runs in a thread: close waits for a line being written
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[bytes] = open(self.path, "a+b")  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise ConfigError(f"cannot open results file {str(self.path)!r}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            raise ConfigError(f"results file {str(self.path)!r} is being written by another batch") from None
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        self._file.seek(0)
        data = self._file.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            if _is_result(data[end:]):  # a whole last line without its newline (a file edited by hand)
                self._file.write(b"\n")
                data += b"\n"
                end = len(data)
            else:  # a torn last line: the write that was cut short never finished that item
                self._file.truncate(end)
            os.fsync(self._file.fileno())
        for number, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                result = ItemResult.from_json(json.loads(line))
            except (ValueError, ConfigError) as exc:
                raise ConfigError(f"{self.path}:{number}: not a batch result ({exc})") from None
            self.finished.setdefault(result.id, result)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.finished

    def append(self, result: ItemResult) -> bool:
        """Write ``result`` as one line, flushed and fsync-ed; blocking file I/O (call it from a thread in
        async code).

        Returns:
            True when written; False when the file already holds the id (nothing is written).

        Raises:
            ConfigError: the store is closed.
            OSError: the write failed (a full disk).
        """
        with self._lock:
            return self._append(result)

    def _append(self, result: ItemResult) -> bool:
        if self._file.closed:
            raise ConfigError("the results file is closed")
        if result.id in self.finished:
            return False
        line = json.dumps(result.to_json(), ensure_ascii=False).encode() + b"\n"
        self._file.seek(0, os.SEEK_END)
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.finished[result.id] = result
        return True

    def close(self) -> None:
        """Release the lock and close the file, after the line being written (by :meth:`append` in another
        thread), if any. Idempotent."""
        with self._lock:
            if not self._file.closed:
                with contextlib.suppress(OSError):
                    fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
                self._file.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

"""A replica's bounded local disk cache of adapter objects, named by sha256 (`<dir>/objects/<sha256>`), and
the directory its uploads are streamed to (`<dir>/uploads/`).

Objects are immutable, so a cached file is either whole (renamed into place after its bytes were checked
against its name) or absent; replicas may even share the directory. The cache is bounded in bytes: adding a file
evicts the least recently used others (by the order this process used them, seeded from the files' mtimes at
start) until the total fits. A file evicted while another process reads it stays readable through its open
descriptor; one evicted between a lookup and the open is fetched again (`open` returns None).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 2 * 2**30


class DiskCache:
    """Files by sha256, least recently used first, at most `max_bytes` in all (a single file larger than that
    is still kept, alone, until the next one comes)."""

    def __init__(self, directory: str, max_bytes: int = DEFAULT_CACHE_BYTES):
        from server.store.local import TEMP_PREFIX, TEMP_SUFFIX, _abandoned, _unlink_quiet, check_writable

        self.dir, self.max_bytes = os.path.abspath(directory), max_bytes
        self.objects, self.uploads = os.path.join(self.dir, "objects"), os.path.join(self.dir, "uploads")
        for d in (self.objects, self.uploads):
            check_writable(d)
        for n in os.listdir(self.uploads):  # a crash's leftovers: temp files no process holds
            p = os.path.join(self.uploads, n)
            if n.startswith(TEMP_PREFIX) and n.endswith(TEMP_SUFFIX) and _abandoned(p):
                _unlink_quiet(p)
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()
        self.bytes = self.evictions = 0
        found = []
        for n in os.listdir(self.objects):
            try:
                st = os.stat(os.path.join(self.objects, n))
            except FileNotFoundError:
                continue
            found.append((st.st_mtime_ns, n, st.st_size))
        for _, n, size in sorted(found):
            self._files[n] = size
            self.bytes += size

    def path(self, sha256: str) -> str:
        return os.path.join(self.objects, sha256)

    def open(self, sha256: str):
        """The cached file of `sha256` opened for reading (marked most recently used), or None."""
        try:
            f = open(self.path(sha256), "rb")
        except FileNotFoundError:
            with self._lock:
                self._drop(sha256)
            return None
        with self._lock:
            if sha256 not in self._files:  # another process added it
                self._files[sha256] = os.fstat(f.fileno()).st_size
                self.bytes += self._files[sha256]
            self._files.move_to_end(sha256)
        return f

    def add(self, sha256: str, tmp_path: str) -> str:
        """Move the whole, checked file `tmp_path` (on this file system) into the cache as `sha256`; evicts the
        least recently used others beyond the bound. Returns its path."""
        size = os.path.getsize(tmp_path)
        os.replace(tmp_path, self.path(sha256))
        with self._lock:
            self._drop(sha256)
            self._files[sha256] = size
            self.bytes += size
            self._evict(keep=sha256)
        return self.path(sha256)

    def _evict(self, keep: str) -> None:
        while self.bytes > self.max_bytes and len(self._files) > 1:
            sha, _ = next(iter(self._files.items()))
            if sha == keep:
                self._files.move_to_end(sha)
                continue
            self._drop(sha)
            try:
                os.unlink(self.path(sha))
            except FileNotFoundError:
                pass
            self.evictions += 1

    def _drop(self, sha256: str) -> None:
        size = self._files.pop(sha256, None)
        if size is not None:
            self.bytes -= size

    def __contains__(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._files

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

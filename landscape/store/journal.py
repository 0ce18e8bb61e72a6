"""A file that changes on disk only at :meth:`JournaledFile.commit`, all at once or not at all.

HDF5 writes through it (h5py's file-object driver): every write lands in memory, and ``commit``
moves the pages that changed onto the disk through a journal, ``NAME.journal``:

1. grow the file to its new size (zeros past the old end, which HDF5 ignores),
2. write the changed pages and a checksum to the journal and fsync it,
3. write the pages into the file in place and fsync it,
4. delete the journal.

A failure in 1 or 2 (a full disk) leaves the file as the last commit made it; a kill in 3 leaves a
complete journal, which the next opening replays. So whatever moment a write fails or a process dies,
the file on disk is the state of one commit: HDF5's own writes, which can leave a file unreadable when
they fail half way, never touch the disk. Memory holds only what changed since the last commit.
"""
from __future__ import annotations

import errno
import hashlib
import os
import struct
from pathlib import Path

PAGE = 1 << 16
MAGIC = b"landscape-journal-1\n"
_HEADER = struct.Struct("<QQQ")   # new size, size of the old content kept, number of pages
_INDEX = struct.Struct("<Q")


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


class JournaledFile:
    """Read/write/seek/tell/truncate/flush over ``path``; see the module docstring.

    ``create``: start empty (the file on disk is emptied at the first commit, not before)."""

    def __init__(self, path, create: bool = False):
        self.path = Path(path)
        recover(self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.disk_size = os.fstat(self.fd).st_size
        self.kept = 0 if create else self.disk_size   # bytes of the disk file that still count
        self.size = self.kept
        self.pages = {}                                # page index -> bytearray(PAGE)
        self.pos = 0

    # the file-object interface h5py uses ----------------------------------------------------------
    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self.size - self.pos))
        done = 0
        while done < n:
            index, offset = divmod(self.pos + done, PAGE)
            take = min(PAGE - offset, n - done)
            view[done:done + take] = self._page(index)[offset:offset + take]
            done += take
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        buf = bytearray(max(0, self.size - self.pos) if n < 0 else n)
        return bytes(buf[:self.readinto(buf)])

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            index, offset = divmod(self.pos + done, PAGE)
            take = min(PAGE - offset, len(view) - done)
            page = self.pages.get(index)
            if page is None:  # a page written whole needs no reading first
                page = bytearray(PAGE) if take == PAGE else bytearray(self._page(index))
                self.pages[index] = page
            page[offset:offset + take] = view[done:done + take]
            done += take
        self.pos += len(view)
        self.size = max(self.size, self.pos)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if size < self.size:
            index, offset = divmod(size, PAGE)
            if offset:  # bytes past the new end read as zeros if the file grows again
                page = self.pages.setdefault(index, bytearray(self._page(index)))
                page[offset:] = bytes(PAGE - offset)
            for i in [i for i in self.pages if i > index or (i == index and not offset)]:
                del self.pages[i]
            self.kept = min(self.kept, size)
        self.size = size
        return size

    def flush(self) -> None:
        pass  # the disk changes at commit only

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    # --------------------------------------------------------------------------------------------
    def _page(self, index: int) -> bytes:
        page = self.pages.get(index)
        if page is not None:
            return page
        start = index * PAGE
        data = os.pread(self.fd, min(PAGE, max(0, self.kept - start)), start) if start < self.kept else b""
        return data + bytes(PAGE - len(data))

    @property
    def dirty(self) -> bool:
        return bool(self.pages) or self.size != self.disk_size or self.kept != self.disk_size

    def commit(self) -> None:
        """Move every change onto the disk (see the module docstring). On an OSError (a full disk),
        the file on disk stays as the last commit left it and the changes stay in memory."""
        if not self.dirty:
            return
        journal = journal_path(self.path)
        try:
            if self.size > self.disk_size:
                _grow(self.fd, self.disk_size, self.size)
            _write_journal(journal, self.size, self.kept, self.pages)
        except BaseException:
            journal.unlink(missing_ok=True)
            os.ftruncate(self.fd, self.disk_size)  # shrinking needs no space
            raise
        _apply(self.fd, self.size, self.kept, self.pages.items())
        journal.unlink()
        self.pages.clear()
        self.disk_size = self.kept = self.size

    def discard(self) -> None:
        """Forget the changes since the last commit."""
        self.pages.clear()
        self.size = self.kept = self.disk_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def closed(self) -> bool:
        return self.fd < 0


def _grow(fd: int, start: int, end: int) -> None:
    """Allocate the bytes [start, end) of the file (zeros), so that writing them later needs no space."""
    try:
        os.posix_fallocate(fd, start, end - start)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        for offset in range(start, end, PAGE):  # a file system without fallocate: write the zeros
            _pwrite(fd, bytes(min(PAGE, end - offset)), offset)


def _write_journal(journal: Path, size: int, kept: int, pages: dict) -> None:
    digest = hashlib.sha256()
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        def put(data):
            digest.update(data)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        put(MAGIC + _HEADER.pack(size, kept, len(pages)))
        for index in sorted(pages):
            put(_INDEX.pack(index) + pages[index])
        os.write(fd, digest.digest())
        os.fsync(fd)
    finally:
        os.close(fd)


def _apply(fd: int, size: int, kept: int, pages) -> None:
    """Write a commit's pages into the file in place (it was grown before the journal was written, so
    this needs no new space); repeating it (a replay after a kill) gives the same file."""
    pages = dict(pages)
    old_end = min(os.fstat(fd).st_size, size)
    for index in range(kept // PAGE, -(-old_end // PAGE)):  # old bytes past ``kept`` read as zeros
        if index not in pages:
            start = max(kept, index * PAGE)
            _pwrite(fd, bytes(min((index + 1) * PAGE, old_end) - start), start)
    for index, page in pages.items():
        start = index * PAGE
        _pwrite(fd, memoryview(page)[:max(0, min(PAGE, size - start))], start)
    os.ftruncate(fd, size)
    os.fsync(fd)


def _pwrite(fd: int, data, offset: int) -> None:
    data = memoryview(data)
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def recover(path: Path) -> None:
    """Finish a commit that a kill interrupted (replay a complete journal) or forget one that never
    completed (its file was not yet touched)."""
    journal = journal_path(Path(path))
    if not journal.exists():
        return
    data = journal.read_bytes()
    body, digest = data[:-32], data[-32:]
    head = len(MAGIC) + _HEADER.size
    if len(data) >= head + 32 and body.startswith(MAGIC) and hashlib.sha256(body).digest() == digest:
        size, kept, count = _HEADER.unpack_from(body, len(MAGIC))
        step = _INDEX.size + PAGE
        pages = [(_INDEX.unpack_from(body, head + i * step)[0],
                  body[head + i * step + _INDEX.size:head + (i + 1) * step]) for i in range(count)]
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _apply(fd, size, kept, pages)
        finally:
            os.close(fd)
    journal.unlink()

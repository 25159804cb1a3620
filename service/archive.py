"""Stream a folder as an uncompressed tar, chunk by chunk (never the whole archive in memory)."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def tar_size(folder: Path, arcname: str) -> int:
    """Exact byte length of :func:`iter_tar` (lets the response carry Content-Length)."""
    total = 0
    for path in _files(folder):
        total += len(_header(path, folder, arcname))
        size = path.stat().st_size
        total += size + (-size % BLOCK)
    return total + 2 * BLOCK


def _header(path: Path, folder: Path, arcname: str) -> bytes:
    info = tarfile.TarInfo(f"{arcname}/{path.relative_to(folder).as_posix()}")
    stat = path.stat()
    info.size = stat.st_size
    info.mtime = int(stat.st_mtime)
    info.mode = 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def iter_tar(folder: Path, arcname: str) -> Iterator[bytes]:
    for path in _files(folder):
        yield _header(path, folder, arcname)
        size = 0
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                size += len(chunk)
                yield chunk
        if pad := -size % BLOCK:
            yield b"\0" * pad
    yield b"\0" * (2 * BLOCK)


def folder_digest(folder: Path) -> tuple[str, int]:
    """SHA-256 over (relative path, content) of every file in sorted order, and the total size."""
    digest = hashlib.sha256()
    total = 0
    for path in _files(folder):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                total += len(chunk)
        digest.update(b"\0")
    return digest.hexdigest(), total

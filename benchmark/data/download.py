"""Resumable, verified downloads and safe archive extraction (used by ``prepare --download``).

A download goes to ``<file>.part`` and is renamed once complete and verified, so an interrupted run
resumes where it stopped (HTTP ``Range`` requests; ``file://`` URLs are read from the offset) and a
half file is never taken for an archive. Extraction writes a marker ``.<archive>.extracted`` in the
target folder so that it is not repeated; members that would land outside the target are refused.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, url2pathname, urlopen

from tqdm import tqdm

from benchmark.errors import DataError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One archive of ``sources.json``."""

    file: str
    url: str
    md5: str | None
    extract_to: str
    provides: tuple[str, ...]
    expect_files: dict = field(default_factory=dict)
    note: str = ""
    # sha256 of the file; shorter than 64 hex digits it is a prefix (torchvision's file-name convention)
    sha256: str | None = None

    @staticmethod
    def from_dict(entry: dict) -> "Source":
        return Source(entry["file"], entry["url"], entry.get("md5"), entry.get("extract_to", "."),
                      tuple(entry.get("provides", ())), dict(entry.get("expect_files", {})), entry.get("note", ""))


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _copy(src, dst, total: int | None, offset: int, name: str, progress: bool) -> None:
    with tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            dst.write(chunk)
            bar.update(len(chunk))


def _fetch_part(url: str, part: Path, name: str, progress: bool) -> None:
    offset = part.stat().st_size if part.exists() else 0
    parsed = urlparse(url)
    if parsed.scheme == "file":
        src_path = Path(url2pathname(parsed.path))
        try:
            total = src_path.stat().st_size
            if offset > total:
                offset = 0
            with open(src_path, "rb") as src, open(part, "ab" if offset else "wb") as dst:
                src.seek(offset)
                _copy(src, dst, total, offset, name, progress)
        except OSError as err:
            raise DataError(f"cannot read {url}: {err}", hint="check the path of the archive") from None
        return
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with urlopen(Request(url, headers=headers), timeout=60) as resp:
            if offset and resp.status != 206:       # the server ignored the range: start again
                offset = 0
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length else None
            with open(part, "ab" if offset else "wb") as dst:
                _copy(resp, dst, total, offset, name, progress)
    except HTTPError as err:
        if err.code == 416 and offset:              # nothing left to fetch: the part is complete
            return
        raise DataError(f"downloading {url} failed: HTTP {err.code} {err.reason}",
                        hint="check the URL in benchmark/data/sources.json or download the file by hand into "
                             f"{part.parent}") from None
    except (URLError, OSError, TimeoutError) as err:
        raise DataError(f"downloading {url} failed: {getattr(err, 'reason', err)}",
                        hint=f"check the network and run the same command again: it resumes from {part}") from None


def download(source: Source, folder: Path, progress: bool = True) -> Path:
    """``folder/<source.file>``, downloaded (resuming a partial download) and checked against its md5."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / source.file
    if dest.exists() and not _checksum_problem(dest, source):
        return dest
    dest.unlink(missing_ok=True)
    part = dest.with_name(dest.name + ".part")
    _fetch_part(source.url, part, source.file, progress)
    problem = _checksum_problem(part, source)
    if problem:
        part.unlink()
        raise DataError(f"checksum mismatch for {source.url}: {problem}",
                        hint="the download is corrupt (or the server changed the file); run the command again "
                             "to download it from scratch")
    os.replace(part, dest)
    return dest


def _checksum_problem(path: Path, source: Source) -> str | None:
    """What is wrong with ``path`` against the source's published checksums (md5, sha256 or its prefix)."""
    if source.md5 is not None and (actual := file_md5(path)) != source.md5:
        return f"expected md5 {source.md5}, got {actual}"
    if source.sha256 is not None and not (actual := file_sha256(path)).startswith(source.sha256.lower()):
        return f"expected sha256 {source.sha256}{'...' if len(source.sha256) < 64 else ''}, got {actual}"
    return None


def _inside(base: Path, name: str) -> bool:
    target = (base / name).resolve()
    return target == base or base in target.parents


def extract(archive: Path, dest: Path) -> None:
    """Unpack a .zip / .tar(.gz) into ``dest`` (once; macOS ``__MACOSX`` entries are skipped)."""
    dest.mkdir(parents=True, exist_ok=True)
    marker = dest / f".{archive.name}.extracted"
    if marker.exists():
        return
    base = dest.resolve()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = [m for m in zf.namelist() if not m.startswith("__MACOSX/")]
                unsafe = [m for m in members if not _inside(base, m)]
                if unsafe:
                    raise DataError(f"{archive} has entries outside the target folder: {unsafe[:3]}",
                                    hint="the archive is not the expected one; delete it")
                zf.extractall(dest, members)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
        else:
            raise DataError(f"{archive} is neither a zip nor a tar archive",
                            hint="delete it and run the command again to download it afresh")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"cannot extract {archive}: {err}",
                        hint="the archive is corrupt; delete it and run the command again") from None
    marker.touch()


def count_files(folder: Path) -> int:
    return sum(1 for entry in os.scandir(folder) if entry.is_file()) if folder.is_dir() else 0


"""Where the paths a user gives point: the driver's own disk, or a URI that pyarrow (and so Ray) reads
(s3://, gs://, file://). Everything that lists, reads or writes a user's files goes through here, so a
catalog, a checkpoint, photos and outputs may each live on either.

On a real cluster no two nodes share a disk: a local path is the driver's alone, a URI reaches every node.
`Place` resolves a location's filesystem once; `read_bytes` retries what object storage fails for a moment;
`staged_output` makes outputs appear whole or not at all, on the disk (a rename) or in a bucket (uploaded
file by file, the run's summary last: the mark of a complete run); `check_writable` tries a location before
anything long starts.
"""

from __future__ import annotations

import os
import posixpath
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from clf.errors import ClfError, ConfigError, first_line

# A remote read that fails (throttling, a 503, a dropped connection) is tried this many times in all, waiting
# BACKOFF_S, then twice that, ... between tries. Within each try pyarrow's S3 client already retries the
# request itself; ours also cover the errors its retries leave alone, and a longer outage
# (docs/failures.md).
READ_ATTEMPTS = 4
BACKOFF_S = 0.5
# Remote files a task reads at once (threads: waiting on the network, not computing).
READ_THREADS = 16
LOCAL = pafs.LocalFileSystem()
# Errors that another try cannot mend.
FINAL_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


# Ray Train's own default storage (ray.train.constants.DEFAULT_STORAGE_PATH; a test checks they agree), which
# a run checks like any other before it starts.
DEFAULT_CHECKPOINT_STORAGE = "~/ray_results"


def checkpoint_storage(storage_path: str | None) -> str:
    """Ray Train's checkpoint storage (--storage-path, or Ray's default) as an absolute path or a URI."""
    location = storage_path or DEFAULT_CHECKPOINT_STORAGE
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def is_uri(location: str) -> bool:
    return "://" in location


def local_path(location: str) -> str | None:
    """The path on this machine's disk that a location names (a path, or a file:// URI); None for object
    storage."""
    if location.startswith("file://"):
        return location[len("file://"):]
    return None if is_uri(location) else os.path.abspath(location)


def sample(items: list, count: int = 3) -> list:
    """A few of `items`, spread over them (the first and the last among them)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


@dataclass(frozen=True)
class Place:
    """A file or folder: its filesystem (resolved once), its path in that filesystem, and the scheme that
    turns such a path back into a location ("s3://"; "" on the driver's disk, where paths are absolute)."""

    fs: pafs.FileSystem
    path: str
    scheme: str

    @classmethod
    def of(cls, location: str) -> Place:
        """ValueError for a URI pyarrow has no filesystem for (or cannot reach the configuration of)."""
        if is_uri(location):
            try:
                fs, path = pafs.FileSystem.from_uri(location)
            except (ValueError, OSError) as e:  # pyarrow: ArrowInvalid (a ValueError) for an unknown scheme
                raise ValueError(f"{location} is not a location pyarrow can reach ({first_line(e)})") from None
            return cls(fs, path.rstrip("/") or path, location.split("://", 1)[0] + "://")
        return cls(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location)), "")

    @property
    def local(self) -> bool:
        """On the disk of the machine that resolved it (a local path or file://): no other node sees it."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def location(self, path: str | None = None) -> str:
        """`path` of this filesystem (default: this place's) as a location a user could have given."""
        return self.scheme + (self.path if path is None else path)

    def child(self, relative: str) -> str:
        return self.location(posixpath.join(self.path, relative))

    def kind(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def files(self) -> list[tuple[str, int]]:
        """(path, size in bytes) of every file in this folder and below, hidden ones (and those in hidden
        folders) aside, sorted by path. Object storage lists sizes with the names; on a local disk a size
        would cost a stat per file (a million of them on NFS), so there it is -1, and only the folders' own
        entries are read."""
        if self.local:
            found = []
            for folder, subfolders, names in os.walk(self.path):
                subfolders[:] = [d for d in subfolders if not d.startswith(".")]
                found += [(os.path.join(folder, n), -1) for n in names if not n.startswith(".")]
            return sorted(found)
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        return sorted(
            (i.path, i.size) for i in infos if i.type == pafs.FileType.File
            and not any(part.startswith(".") for part in i.path[len(self.path):].split("/"))
        )

    def resolve(self, entry: str) -> str:
        """An entry of a listing kept in this place: a URI or an absolute path as it is, a relative path
        relative to the listing's folder. An empty entry stays empty (its row then says so)."""
        if not entry or is_uri(entry) or posixpath.isabs(entry):
            return entry
        return self.location(posixpath.normpath(posixpath.join(posixpath.dirname(self.path), entry)))

    def read_bytes(self, path: str | None = None) -> bytes:
        return read_bytes(self.fs, self.path if path is None else path)


def locate(location: str, flag: str, error: type[Exception] = ConfigError) -> tuple[Place, pafs.FileType]:
    """Where a location a flag gives points, and what is there (a folder, a file, nothing); `error` (naming the
    flag) when it cannot be reached."""
    try:
        place = Place.of(location)
        return place, place.kind()
    except (OSError, ValueError) as e:
        raise error(f"{flag} {location} cannot be reached ({first_line(e)})") from None


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """A whole file. On the local disk, read once (Python's own errors: IsADirectoryError and the like); a
    remote read that fails in a way another try may mend is tried again with backoff before it is raised."""
    if isinstance(fs, pafs.LocalFileSystem):
        with open(path, "rb") as f:
            return f.read()
    for attempt in range(READ_ATTEMPTS):
        try:
            with fs.open_input_file(path) as f:
                return f.read()
        except FINAL_ERRORS:
            raise
        except OSError:
            if attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def read_each(locations: list[str]) -> list[bytes | Exception | None]:
    """The bytes of each file, or the exception reading it raised (None for an empty location), in order.
    Each filesystem is resolved once (one S3 client per bucket, not one per file); remote files are read
    READ_THREADS at a time, as a round trip to object storage takes tens of milliseconds that one file after
    another would add up; local files are read in turn."""
    places: dict[str, Place] = {}

    def read(location: str) -> bytes | Exception | None:
        if not location:
            return None
        try:
            if not is_uri(location) or location.startswith("file://"):
                return read_bytes(LOCAL, local_path(location))
            scheme, rest = location.split("://", 1)
            root = f"{scheme}://{rest.split('/', 1)[0]}"  # the bucket: one filesystem each
            if root not in places:
                places[root] = Place.of(root)
            return read_bytes(places[root].fs, rest)
        except Exception as e:  # noqa: BLE001 - returned: each file's error belongs to its row
            return e

    if not any(is_uri(loc) and not loc.startswith("file://") for loc in locations):
        return [read(loc) for loc in locations]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(read, locations))


def read_location(location: str) -> bytes:
    """The bytes of a file given as a local path or a URI (retried as `read_bytes` says)."""
    return Place.of(location).read_bytes()


# --- Trying a location before anything long starts ---------------------------------------------------------

MARKER_PREFIX = ".clf-check-"


def write_marker(location: str, flag: str) -> str:
    """Write a small marker file in the folder `location` names (created on a local disk if need be; object
    storage has no folders to create); the marker's location. ConfigError, naming the flag, when it cannot be
    written (a read-only path, a bucket that does not exist, credentials refused)."""
    try:
        place = Place.of(location)
        if place.local:
            place.fs.create_dir(place.path, recursive=True)
        marker = posixpath.join(place.path, MARKER_PREFIX + secrets.token_hex(4))
        with place.fs.open_output_stream(marker) as f:
            f.write(b"written by clf to check that this location can be written; safe to delete\n")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {location} cannot be written ({first_line(e)})") from None
    return place.location(marker)


def remove(location: str) -> None:
    """Delete one file; one already gone is no error."""
    place = Place.of(location)
    try:
        place.fs.delete_file(place.path)
    except FileNotFoundError:
        pass


def check_writable(location: str, flag: str) -> None:
    remove(write_marker(location, flag))


# --- Outputs that appear whole or not at all ---------------------------------------------------------------


@contextmanager
def staged_output(output: str, last: str) -> Iterator[Path]:
    """A folder on the driver's disk to fill in place of `output`. When the block ends, it becomes `output`:
    on the driver's disk, renamed into place at once; in object storage, uploaded file by file with `last`
    (the run's summary) uploaded last, so an output without it is incomplete. When the block raises
    (Ctrl-C included), nothing is left at `output`. An existing `output` is refused before anything runs."""
    place = _new_output(output)
    if place.local:
        staging = _local_staging(Path(place.path))
    else:
        write_marker(output, "--output")
        _clear(place)
        staging = Path(tempfile.mkdtemp(prefix="clf-output-"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if place.local:
        staging.rename(place.path)
        return
    try:
        _upload(staging, place, last)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_new_output(output: str) -> None:
    """ConfigError unless `output` is free to be written (a job that writes it only at its end asks first)."""
    _new_output(output)


def _new_output(output: str) -> Place:
    try:
        place = Place.of(output)
        kind = place.kind()
    except (OSError, ValueError) as e:
        raise ConfigError(f"--output {output} cannot be reached ({first_line(e)})") from None
    if kind != pafs.FileType.NotFound:
        raise ConfigError(f"--output {output} exists already; choose a new folder (runs are never overwritten)")
    return place


def _local_staging(output: Path) -> Path:
    """The temporary folder to fill, beside `output` on the same disk (so that the rename is one step)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    except OSError as e:
        raise ConfigError(f"--output {output} cannot be written ({e.strerror or e})") from None
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the run folder gets the usual mode
    return staging


def _clear(place: Place) -> None:
    """Remove everything under a new output's prefix (it held nothing before this run), folder markers
    included: pyarrow's S3 client leaves one when it deletes a folder's last file, and the prefix would then
    look like an existing output."""
    try:
        place.fs.delete_dir(place.path)
    except FileNotFoundError:
        pass


def _upload(staging: Path, place: Place, last: str) -> None:
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
    local = pafs.LocalFileSystem()
    try:
        for file in files:
            target = posixpath.join(place.path, file.relative_to(staging).as_posix())
            pafs.copy_files(str(file), target, source_filesystem=local, destination_filesystem=place.fs)
    except OSError as e:
        try:
            _clear(place)  # what was uploaded would look like part of a run
        except OSError:
            pass
        raise ClfError(f"--output {place.location()}: uploading {file.name} failed ({first_line(e)}); "
                       f"no {last} was written there, so nothing there is a complete output") from None

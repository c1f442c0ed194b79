"""Hub datasets through a prepared-data cache on storage that every node of a job sees.

    cache = HubCache.create(cfg.cache_dir, cfg.offline)        # data.cache_dir, data.offline
    ds = cache.load("allenai/ultrafeedback_binarized_cleaned", "train_prefs")

A hub source is read from its prepared copy when one exists:
``<cache>/<org>--<name>/<split>.parquet`` with a manifest beside it, ``<split>.json``,
recording the source, the split, the row count, the size and the SHA-256 of the Parquet
file. A copy that does not match its manifest (truncated, damaged, replaced, prepared for
another source) is an error naming the file, never read silently.

When no copy exists, the first process to take the copy's lock (``<split>.parquet.lock``,
a POSIX record lock, which NFS, GPFS and Lustre mounted with ``flock`` share between
nodes) downloads the split, writes the Parquet file and then the manifest under
temporary names and renames each into place; every other process blocks on the lock and
then reads that copy, so the hub is contacted once per job and every rank gets the same
rows. A process that dies holding the lock releases it; the next one downloads again.

``megarlhf prepare-data`` (``megarlhf.data.prepare``) fills the cache on a machine with
internet, a login node, before a job is submitted. With ``data.offline=true``, or
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set to 1 in the job's environment, nothing
contacts the hub: a source without a prepared copy is an error that names it and says to
run ``megarlhf prepare-data``.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

from megarlhf.data.errors import DataError

__all__ = ["HubCache", "PreparedCopy", "fetch_from_hub", "default_cache_dir", "offline_reason",
           "CACHE_ENV", "OFFLINE_ENV"]

CACHE_ENV = "MEGARLHF_DATA_CACHE"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")  # Hugging Face's own switches
MANIFEST_FORMAT = "megarlhf-prepared-data/1"
_TRUE = ("1", "ON", "YES", "TRUE")
_PREPARE = "megarlhf prepare-data RECIPE --config FILE [key=value ...]"


def fetch_from_hub(path: str, split: str) -> Any:
    """The one place megarlhf contacts the Hugging Face hub for data: one split of a hub
    dataset, as a ``datasets.Dataset`` (``datasets`` keeps its own download cache)."""
    import datasets  # 1.3 s to import: only where a hub source is read, as in megarlhf.data.load

    return datasets.load_dataset(path, split=split)


def default_cache_dir() -> str:
    """Where prepared copies live when ``data.cache_dir`` is not set: ``$MEGARLHF_DATA_CACHE``,
    else ``$XDG_CACHE_HOME/megarlhf/data``, else ``~/.cache/megarlhf/data``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megarlhf", "data")


def offline_reason(config_offline: bool) -> Optional[str]:
    """Why the hub is off limits (``data.offline=true`` or a Hugging Face offline variable
    set to 1/ON/YES/TRUE), or None when it may be contacted."""
    if config_offline:
        return "data.offline=true"
    for var in OFFLINE_ENV:
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var}={os.environ[var]}"
    return None


def _slug(text: str) -> str:
    """A file name for a hub name or split: no separators, no traversal. Two names that map
    to the same slug are told apart by the manifest (an error, not a mix-up)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "--"))
    return "_" + s if s.strip(".") == "" else s


@dataclass(frozen=True)
class PreparedCopy:
    """A prepared copy of one split of a hub dataset, checked against its manifest."""

    source: str
    """The hub dataset name (``data.sources[i].path``)."""
    split: str
    rows: int
    bytes: int
    """Size of the Parquet file."""
    sha256: str
    file: str
    """The Parquet file."""
    manifest: str
    """The JSON manifest beside it."""
    downloaded: bool
    """Whether this process downloaded it (False: it was already prepared)."""


class HubCache:
    """Prepared copies of hub datasets under one folder; see the module's docstring."""

    def __init__(self, root: str, offline: Optional[str] = None):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.offline = offline  # why the hub may not be contacted (e.g. "HF_HUB_OFFLINE=1"), or None

    @classmethod
    def create(cls, cache_dir: Optional[str], offline: bool = False) -> "HubCache":
        """The cache of ``data.cache_dir`` (default: :func:`default_cache_dir`), offline when
        ``data.offline`` or the environment says so."""
        return cls(cache_dir or default_cache_dir(), offline_reason(offline))

    def files(self, path: str, split: str) -> Tuple[str, str]:
        """(Parquet file, manifest) of a source's split."""
        folder = os.path.join(self.root, _slug(path))
        return os.path.join(folder, _slug(split) + ".parquet"), os.path.join(folder, _slug(split) + ".json")

    def load(self, path: str, split: str) -> Any:
        """The split's rows as a ``datasets.Dataset``, from the prepared copy; without one,
        downloaded once (by whichever process takes the lock first) or, offline, an error."""
        found = self._read(path, split, downloaded=False)
        if found is None:
            if self.offline:
                raise DataError(
                    f"hub dataset {path!r} (split {split!r}) has no prepared copy in {self.root} "
                    f"(no {os.path.relpath(self.files(path, split)[1], self.root)}) and the hub may "
                    f"not be contacted ({self.offline}). On a machine with internet (a "
                    f"login node) run `{_PREPARE}` with this job's config and the same cache "
                    f"(data.cache_dir, else ${CACHE_ENV}), then submit the job again")
            found = self._prepare(path, split, force=False)
        return found[1]

    def prepare(self, path: str, split: str, force: bool = False) -> PreparedCopy:
        """Make sure a verified copy of the split exists (``force``: download it again)."""
        return self._prepare(path, split, force)[0]

    # -- internals ---------------------------------------------------------------------------
    def _prepare(self, path: str, split: str, force: bool) -> Tuple[PreparedCopy, Any]:
        data_file, manifest = self.files(path, split)
        try:
            os.makedirs(os.path.dirname(data_file), exist_ok=True)
        except OSError as e:
            raise DataError(f"{os.path.dirname(data_file)}: cannot create the prepared-data folder "
                            f"({e.strerror}): set data.cache_dir (or ${CACHE_ENV}) to a writable "
                            "folder that every node sees") from e
        with _locked(data_file + ".lock"):
            if not force:
                found = self._read(path, split, downloaded=False)
                if found is not None:  # another process prepared it while this one waited
                    return found
            else:  # readers that look while the copy is replaced find no manifest: they wait
                _remove(manifest)
            # The lock is held: no other process is writing this copy.
            for name in (data_file, manifest):
                for stale in glob.glob(glob.escape(name) + ".*.tmp"):
                    _remove(stale)  # left by a process that died while writing
            print(f"megarlhf: downloading hub dataset {path} (split {split}) into {data_file}", flush=True)
            try:
                ds = fetch_from_hub(path, split)
            except Exception as e:
                raise DataError(
                    f"cannot load hub dataset {path!r} (split {split!r}): {type(e).__name__}: {e}. "
                    f"For a job on compute nodes without internet, prepare it beforehand on a "
                    f"machine with internet (a login node): `{_PREPARE}`") from e
            tag = f".{socket.gethostname()}.{os.getpid()}.tmp"
            ds.to_parquet(data_file + tag)
            size, digest = _size_and_sha256(data_file + tag)
            os.replace(data_file + tag, data_file)
            record = {"format": MANIFEST_FORMAT, "source": path, "split": split, "rows": len(ds),
                      "bytes": size, "sha256": digest, "file": os.path.basename(data_file),
                      "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "host": socket.gethostname()}
            with open(manifest + tag, "w") as f:
                json.dump(record, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(manifest + tag, manifest)  # the copy is complete from here on
            _fsync_dir(os.path.dirname(data_file))
            found = self._read(path, split, downloaded=True)
            assert found is not None
            return found

    def _read(self, path: str, split: str, downloaded: bool) -> Optional[Tuple[PreparedCopy, Any]]:
        """The verified copy and its rows, or None when there is no manifest (not prepared)."""
        import datasets  # where a hub source is read, as fetch_from_hub
        import pyarrow as pa
        import pyarrow.parquet as pq

        data_file, manifest = self.files(path, split)
        redo = f"delete it and {os.path.basename(manifest)} and prepare it again (`{_PREPARE} --force`)"
        try:
            with open(manifest, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        m = _parse_manifest(manifest, raw, redo)
        if (m["source"], m["split"]) != (path, split):
            raise DataError(f"{manifest}: a prepared copy of {m['source']!r} split {m['split']!r}, not of "
                            f"{path!r} split {split!r} (their file names collide): delete it, or give "
                            "this source its own data.cache_dir")
        try:
            with open(data_file, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError(f"{data_file}: missing, but its manifest {manifest} exists: {redo}") from None
        if len(data) != m["bytes"]:
            raise DataError(f"{data_file}: {len(data)} bytes, but its manifest {manifest} records "
                            f"{m['bytes']}: a partial or damaged copy; {redo}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != m["sha256"]:
            raise DataError(f"{data_file}: its content does not match the SHA-256 in its manifest "
                            f"{manifest}: a damaged or replaced copy; {redo}")
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as e:  # arrow's errors for a file that is not Parquet
            raise DataError(f"{data_file}: cannot read as Parquet: {type(e).__name__}: {e}; {redo}") from e
        if table.num_rows != m["rows"]:
            raise DataError(f"{data_file}: {table.num_rows} rows, but its manifest {manifest} records "
                            f"{m['rows']}; {redo}")
        # The features (column types) written by datasets travel in the file's schema: the
        # rows read here are those the hub's own Dataset gives.
        ds = datasets.Dataset(datasets.table.InMemoryTable(table))
        copy = PreparedCopy(source=path, split=split, rows=m["rows"], bytes=m["bytes"], sha256=digest,
                            file=data_file, manifest=manifest, downloaded=downloaded)
        return copy, ds


def _parse_manifest(manifest: str, raw: bytes, redo: str) -> Dict[str, Any]:
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{manifest}: not a readable prepared-data manifest ({e}): a partial or "
                        f"damaged file; {redo}") from None
    want = {"source": str, "split": str, "rows": int, "bytes": int, "sha256": str}
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{manifest}: not a prepared-data manifest of format {MANIFEST_FORMAT!r}; {redo}")
    for key, kind in want.items():
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise DataError(f"{manifest}: field {key!r} missing or not a {kind.__name__}; {redo}")
    return m


@contextmanager
def _locked(lock_path: str) -> Iterator[None]:
    """An exclusive POSIX lock on ``lock_path``, held for the block (blocking until free).
    Closing the descriptor, or the process dying, releases it. The lock file stays: removing
    it could let two processes hold locks on two different files of the same name."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise DataError(f"{lock_path}: cannot create the lock file of a prepared copy ({e.strerror}): "
                        f"set data.cache_dir (or ${CACHE_ENV}) to a writable folder") from e
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
        except OSError as e:  # e.g. ENOLCK: an NFS mount without a lock service
            raise DataError(f"{lock_path}: cannot lock ({e.strerror}): the filesystem of the data cache "
                            f"has no working file locks; prepare the data before the job (`{_PREPARE}`) "
                            "or put data.cache_dir on another filesystem") from e
        yield
    finally:
        os.close(fd)


def _size_and_sha256(path: str) -> Tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    """Make the renames durable (best effort: not every filesystem lets a folder be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Paths that may be local or in a bucket (`gs://...`, or any fsspec URL such as `s3://...`).

Every file the project reads or writes outside of orbax goes through here: local paths with
the os module (atomic `os.replace`, positioned reads), URLs through fsspec (gcsfs for `gs://`).
Orbax checkpoints reach the same buckets through etils.epath (set here to use fsspec too, so
one set of credentials serves both) and tensorstore.

Credentials for `gs://` are Google's application default credentials: on a TPU or GCE VM the
VM's service account, elsewhere `gcloud auth application-default login` or
GOOGLE_APPLICATION_CREDENTIALS. A missing bucket or a refused request is raised as
FileNotFoundError / PermissionError naming the path and what to check.

Shards of a remote dataset are not read in place: `local_copy` copies each to a per-host cache
once (checked against the sha256 the dataset's info file records), and every later read, in
this run or a restarted one, is a local positioned read.
"""
from __future__ import annotations

import base64
import builtins
import contextlib
import glob as _glob
import hashlib
import json
import os
import posixpath
import re
import shutil
import struct
from typing import IO, Any, Iterator, List, Optional

# etils.epath (orbax's paths) picks TensorFlow's gfile for gs:// whenever TensorFlow is
# installed; fsspec instead, so that orbax and this module share one client and its settings
# (STORAGE_EMULATOR_HOST included). Read once, at epath's first remote path.
os.environ.setdefault("EPATH_USE_TF", "0")

CACHE_ENV = "UNIEMOX_CACHE_DIR"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str) -> bool:
  """True for a URL other than file:// (gs://, s3://, memory://, ...)."""
  return bool(_URL.match(str(path))) and not str(path).startswith("file://")


def _local(path: str) -> str:
  path = os.fspath(path)
  return path[len("file://"):] if path.startswith("file://") else path


def join(base: str, *parts: str) -> str:
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(_local(base), *parts)


def absolute(path: str) -> str:
  """A local path made absolute; a URL as it is (os.path.abspath would turn gs://b/x into
  <cwd>/gs:/b/x)."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(_local(path))


def dirname(path: str) -> str:
  return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def basename(path: str) -> str:
  return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def filesystem(path: str):
  """The fsspec filesystem of a URL (one client per protocol, cached by fsspec). For gs://,
  the storage service is checked reachable first (`check_reachable`)."""
  import fsspec  # pylint: disable=g-import-not-at-top
  protocol = path.split("://", 1)[0]
  if protocol in ("gs", "gcs"):
    check_reachable(path)
  try:
    return fsspec.filesystem(protocol)
  except ImportError as e:
    raise ImportError(f"{path}: reading {protocol}:// needs an fsspec backend ({e}); "
                      "for gs:// `pip install gcsfs`") from None


# How long a command tries to reach the storage service before it gives up (seconds). gcsfs
# retries each request 6 times with backoff (about 33 s) and a command makes several, so an
# unreachable service took over a minute and a hundred lines of tracebacks to report.
CONNECT_BUDGET_ENV = "UNIEMOX_STORAGE_CONNECT_S"
CONNECT_BUDGET_S = 10.0
_reachable: dict = {}


def _gcs_endpoint():
  """(host, port, how it was chosen) of what a gs:// request connects to first: the
  emulator, an HTTPS proxy, or Google's storage service."""
  import urllib.parse  # pylint: disable=g-import-not-at-top
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
  if emulator:
    url, why = (emulator if "://" in emulator else f"http://{emulator}"), "STORAGE_EMULATOR_HOST"
  elif proxy:
    url, why = (proxy if "://" in proxy else f"http://{proxy}"), "HTTPS_PROXY"
  else:
    url, why = "https://storage.googleapis.com", "Google Cloud Storage"
  parts = urllib.parse.urlsplit(url)
  return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), why


def check_reachable(path: str) -> None:
  """Fails within CONNECT_BUDGET_S (environment: UNIEMOX_STORAGE_CONNECT_S) when no TCP
  connection to the storage service can be made, naming `path`, what was tried and what to
  check. Checked once per endpoint and process."""
  import socket  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  host, port, why = _gcs_endpoint()
  if _reachable.get((host, port)):
    return
  budget = float(os.environ.get(CONNECT_BUDGET_ENV) or CONNECT_BUDGET_S)
  deadline, tries, last = time.monotonic() + budget, 0, None
  while True:
    tries += 1
    try:
      timeout = max(0.5, min(5.0, deadline - time.monotonic()))
      socket.create_connection((host, port), timeout=timeout).close()
      _reachable[(host, port)] = True
      return
    except OSError as e:
      last = e
    if time.monotonic() + 1.0 > deadline:
      break
    time.sleep(1.0)
  raise ConnectionError(
      f"{path}: cannot reach the storage service at {host}:{port} ({why}; {tries} "
      f"connection attempts over {budget:.0f} s, last: {last}); check this machine's network, "
      f"DNS and proxy settings (or STORAGE_EMULATOR_HOST); {CONNECT_BUDGET_ENV}=SECONDS waits "
      "longer on a slow network")


def _bucket(path: str) -> str:
  return path.split("://", 1)[1].split("/", 1)[0]


def _explained(e: BaseException, path: str) -> BaseException:
  """A remote failure in words: which path, and what to check."""
  code = getattr(e, "code", None) or getattr(e, "status", None)
  text = str(e).splitlines()[0] if str(e) else type(e).__name__
  creds = ("check the credentials (application default credentials: the VM's service "
           "account on a TPU/GCE VM, else `gcloud auth application-default login` or "
           "GOOGLE_APPLICATION_CREDENTIALS) and that they may use this bucket")
  if isinstance(e, PermissionError) or code in (401, 403):
    return PermissionError(f"{path}: access refused ({text}); {creds}")
  if ("bucket" in text.lower() and "not found" in text.lower()) or "NoSuchBucket" in text:
    return FileNotFoundError(f"{path}: the bucket {_bucket(path)!r} does not exist or is not "
                             f"visible ({text}); {creds}")
  return e


@contextlib.contextmanager
def _remote(path: str) -> Iterator[None]:
  try:
    yield
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    better = _explained(e, path)
    if better is e:
      raise
    raise better from e


def _either(local_fn, remote_name: str):
  """A query of a path: `local_fn` on a local path, the fsspec method `remote_name` on a URL."""
  def query(path: str):
    if not is_remote(path):
      return local_fn(_local(path))
    with _remote(path):
      return getattr(filesystem(path), remote_name)(path)
  return query


exists = _either(os.path.exists, "exists")
isdir = _either(os.path.isdir, "isdir")
isfile = _either(os.path.isfile, "isfile")
getsize = _either(os.path.getsize, "size")


def listdir(path: str) -> List[str]:
  """Names (not paths) of what `path` holds."""
  if not is_remote(path):
    return os.listdir(_local(path))
  with _remote(path):
    entries = filesystem(path).ls(path, detail=False, refresh=True)
  return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})


def glob(pattern: str) -> List[str]:
  """Paths matching a glob pattern, in the form of the pattern (URLs keep their scheme)."""
  if not is_remote(pattern):
    return sorted(_glob.glob(_local(pattern)))
  protocol = pattern.split("://", 1)[0]
  with _remote(pattern):
    fs = filesystem(pattern)
    fs.invalidate_cache()
    return sorted(f"{protocol}://{p}" for p in fs.glob(pattern))


def escape(path: str) -> str:
  """`path` with glob's special characters quoted."""
  return _glob.escape(path)


def makedirs(path: str) -> None:
  """Creates a local folder with its parents; for a bucket, checks that the bucket exists
  (object stores have no folders: a prefix exists once something is written under it)."""
  if not is_remote(path):
    os.makedirs(_local(path), exist_ok=True)
    return
  with _remote(path):
    fs = filesystem(path)
    bucket = f"{path.split('://', 1)[0]}://{_bucket(path)}"
    if not fs.exists(bucket):
      raise FileNotFoundError(f"{path}: the bucket {_bucket(path)!r} does not exist (create "
                              f"it first, e.g. `gcloud storage buckets create {bucket}`)")


def check_writable(path: str) -> None:
  """Creates the folder `path` and checks a file can be written in it (locally: a probe file,
  removed again), so that a read-only or forbidden location fails before any work is done."""
  makedirs(path)
  if is_remote(path):
    return         # a bucket refuses with the first write, which names the path
  probe = os.path.join(_local(path), f".uniemox-write-check-{os.getpid()}")
  with naming(path, probe):
    builtins.open(probe, "wb").close()
  os.remove(probe)


def open(path: str, mode: str = "r", **kwargs) -> IO:  # pylint: disable=redefined-builtin
  if not is_remote(path):
    return builtins.open(_local(path), mode, **kwargs)
  with _remote(path):
    return filesystem(path).open(path, mode, **kwargs)


def read_text(path: str) -> str:
  with open(path, "r", encoding="utf-8") as f:
    return f.read()


_REQUIRED = object()


def read_json(path: str, what: str = "", where: str = "", missing: Any = _REQUIRED,
              damaged: str = "") -> Any:
  """The JSON file at `path`, or `missing` where there is none. Errors name the file as
  "<what> <path> (<where>)": one that does not exist (when no `missing` is given), one that
  does not parse (then `damaged` says what to do)."""
  name = " ".join(filter(None, [what, path, where and f"({where})"]))
  try:
    text = read_text(path)        # one request: no existence check before it
  except FileNotFoundError:
    if missing is _REQUIRED:
      raise FileNotFoundError(f"{name} does not exist") from None
    return missing
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{name} is not valid JSON ({e})" + (f": {damaged}" if damaged else "")
                     ) from None


def write_text(path: str, text: str) -> None:
  """Writes a whole file so that no reader sees part of it: locally a temporary file renamed
  into place; in a bucket one upload (an object appears only once its upload completes)."""
  write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def naming(path: str, temporary: Optional[str] = None) -> Iterator[None]:
  """An OSError raised inside without a file name (a write() that found the disk full), or
  naming the `temporary` file that stands for `path`, names `path` instead."""
  try:
    yield
  except OSError as e:
    if e.filename not in (None, temporary) or not e.errno:
      raise
    raise OSError(e.errno, e.strerror, path) from e


@contextlib.contextmanager
def _replacing(path: str) -> Iterator[str]:
  """A temporary name beside the local file `path`, renamed into place when the block ends
  well; removed when it fails, so a failed write leaves no partial file behind. An OSError
  that names the temporary names `path`."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with naming(path, tmp):
      yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
  if is_remote(path):
    with _remote(path):
      filesystem(path).pipe_file(path, data)
    return
  with _replacing(_local(path)) as tmp, builtins.open(tmp, "wb") as f:
    f.write(data)


def create_exclusive(path: str, data: bytes) -> bool:
  """Writes `path` only if it does not exist, atomically: False (nothing written) if it does.
  Locally O_EXCL; in a bucket an upload with the precondition "no live generation" (GCS's
  ifGenerationMatch=0), so of two hosts racing for one name exactly one wins."""
  if is_remote(path):
    with _remote(path):
      try:
        filesystem(path).pipe_file(path, data, mode="create")
      except FileExistsError:
        return False
    return True
  try:
    fd = os.open(_local(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with builtins.open(fd, "wb") as f:
    f.write(data)
  return True


def generation(path: str) -> Optional[str]:
  """The bucket's generation of the object at `path` (None for local files)."""
  if not is_remote(path):
    return None
  with _remote(path):
    fs = filesystem(path)
    fs.invalidate_cache(path)
    value = fs.info(path).get("generation")
  return None if value is None else str(value)


def remove_generation(path: str, generation_: Optional[str]) -> bool:
  """Deletes the object at `path` only while it is still at `generation_` (GCS's
  ifGenerationMatch): False when another writer replaced or removed it first. Local files
  (generation None) are removed unconditionally."""
  if not is_remote(path) or generation_ is None:
    try:
      remove(path)
    except FileNotFoundError:
      return False
    return True
  fs = filesystem(path)
  bucket, key = path.split("://", 1)[1].split("/", 1)
  try:
    with _remote(path):
      fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=generation_)
  except (FileNotFoundError, FileExistsError):    # gone, or precondition failed (412)
    return False
  finally:
    fs.invalidate_cache(path)
  return True


def remove(path: str) -> None:
  if not is_remote(path):
    os.remove(_local(path))
    return
  with _remote(path):
    filesystem(path).rm_file(path)


def rmtree(path: str) -> None:
  if not is_remote(path):
    shutil.rmtree(_local(path))
    return
  with _remote(path):
    filesystem(path).rm(path, recursive=True)


def upload(local_path: str, path: str) -> None:
  """Copies a local file to `path` (local: a rename-into-place copy; remote: one upload)."""
  if not is_remote(path):
    with _replacing(_local(path)) as tmp:
      shutil.copyfile(local_path, tmp)
    return
  with _remote(path):
    filesystem(path).put_file(local_path, path)


def crc32c_b64(data_crc: int) -> str:
  """A CRC32C as GCS writes it in object metadata (base64 of the big-endian uint32)."""
  return base64.b64encode(struct.pack(">I", data_crc)).decode()


def remote_crc32c(path: str) -> Optional[str]:
  """The CRC32C a bucket keeps for an object (GCS's metadata), or None where there is none."""
  with _remote(path):
    info = filesystem(path).info(path)
  return info.get("crc32c")


def cache_dir() -> str:
  """Where remote shards are copied: $UNIEMOX_CACHE_DIR, else ~/.cache/uniemox_jax."""
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                   "uniemox_jax")


def local_copy(path: str, size: Optional[int] = None, sha256: Optional[str] = None,
               dest: Optional[str] = None) -> str:
  """A local path holding the file at `path`: `path` itself when local; else a copy in the
  host's cache, made once (into a temporary name, hashed on the way, renamed when complete) and
  reused by later calls and later runs. `size` and `sha256` (when given: the dataset's info
  file) are what the copy must match; a mismatch is an error naming the remote file. `dest`:
  the local path to use instead of the cache's own name (an index beside its shard's copy)."""
  if not is_remote(path):
    return _local(path)
  protocol, rest = path.split("://", 1)
  with _remote(path):
    info = filesystem(path).info(path)
  remote_size = int(info["size"])
  if size is not None and remote_size != size:
    raise IOError(f"{path} is {remote_size} bytes but the dataset's info file says {size}: "
                  "the shard was replaced or damaged after conversion")
  # Keyed by what identifies this version of the object, so a replaced object is fetched anew.
  version = str(info.get("generation") or info.get("etag") or info.get("mtime") or "")
  key = hashlib.sha256(f"{path}|{remote_size}|{sha256 or ''}|{version}".encode()).hexdigest()
  local = dest or os.path.join(cache_dir(), "files", protocol,
                               rest.rstrip("/").replace("/", os.sep) + f".{key[:16]}")
  if os.path.exists(local) and os.path.getsize(local) == remote_size:
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  free = shutil.disk_usage(os.path.dirname(local)).free
  if free < remote_size:
    raise OSError(f"no room to cache {path} ({remote_size} bytes, {free} free under "
                  f"{cache_dir()}); point {CACHE_ENV} at a larger disk")
  digest = hashlib.sha256()
  with _replacing(local) as tmp, _remote(path), \
      filesystem(path).open(path, "rb", block_size=1 << 24) as src, builtins.open(tmp, "wb") as dst:
    for chunk in iter(lambda: src.read(1 << 24), b""):
      digest.update(chunk)
      dst.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
      raise IOError(f"{path}: its sha256 is {digest.hexdigest()}, the dataset's info file says "
                    f"{sha256}: the shard was replaced or damaged after conversion")
  return local


class LocalMirror:
  """A local folder that stands for `directory` for writers that need a local path
  (TensorBoard's event files, the metrics log). For a local `directory` it is the directory
  itself and `push` does nothing; for a bucket, a folder in this host's cache whose files
  `push` uploads when they changed (at most every `period` seconds unless `force`)."""

  def __init__(self, directory: str, period: float = 60.0):
    self.directory = absolute(directory)
    self.remote = is_remote(directory)
    if self.remote:
      key = hashlib.sha256(self.directory.encode()).hexdigest()[:16]
      self.local = os.path.join(cache_dir(), "workdirs", key)
      shutil.rmtree(self.local, ignore_errors=True)     # another run's leftovers
    else:
      self.local = self.directory
    os.makedirs(self.local, exist_ok=True)
    self.period = period
    self._sent: dict = {}
    self._last = 0.0

  def path(self, name: str) -> str:
    return os.path.join(self.local, name)

  def pull(self, name: str) -> str:
    """The local path of `name`, holding the remote file's contents when there is one (so a
    resumed run appends to the log its previous run left)."""
    local = self.path(name)
    if self.remote:
      remote = join(self.directory, name)
      if exists(remote):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with _remote(remote):
          filesystem(remote).get_file(remote, local)
        self._sent[name] = _signature(local)
      elif os.path.exists(local):
        os.remove(local)        # a stale copy of another run of this workdir
    return local

  def push(self, force: bool = False) -> None:
    import time  # pylint: disable=g-import-not-at-top
    if not self.remote or (not force and time.monotonic() - self._last < self.period):
      return
    self._last = time.monotonic()
    for root, _, files in os.walk(self.local):
      for f in files:
        local = os.path.join(root, f)
        name = os.path.relpath(local, self.local).replace(os.sep, "/")
        signature = _signature(local)
        if self._sent.get(name) != signature:
          upload(local, join(self.directory, name))
          self._sent[name] = signature


def _signature(path: str):
  st = os.stat(path)
  return (st.st_size, st.st_mtime_ns)

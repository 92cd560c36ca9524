"""Multi-process start-up, barriers, and processes that fail together.

`initialize` starts `jax.distributed` when a run spans several processes: explicitly (flags,
used by the tests and by hand-started multi-node runs) or where JAX detects the cluster
(SLURM jobs with several tasks, TPU pod slices). The coordinator binds to the address it is
given, not to every interface.

A run of several processes must end together. JAX's coordination service ends every process
when one stops sending heartbeats (a process killed outright: `heartbeat_timeout_s`, lowered
from JAX's 100 s to 30 s). For an
exception, the failing process writes its message into the service's key-value store
(`report_failure`) and exits; a watchdog thread in every process (`start_watchdog`) polls
that key and ends its process with the failing one's message, even while the main thread is
blocked in a collective that will never complete. Process 0 hosts the service, so it leaves
last, once the others have read the message.

One-time work that differs between processes (a demo dataset written by process 0, a compile
that hits the persistent cache on one process and not on another) is followed by a barrier
(`barrier`, `compile_together`) with a long timeout, so that no collective starts while a
peer is still busy: gloo gives up on a collective after 30 s.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Optional

from absl import logging
import jax

FAILURE_KEY = "uniemox/failure"
ACK_KEY = "uniemox/failure_seen/"
# How long a failing process waits for the others to read its message before it exits (the
# coordination service lives in process 0: when it goes, the others end without the message).
ACK_WAIT_S = 5.0
HEARTBEAT_TIMEOUT_S = 30
# One-time work on process 0 (a demo dataset, a tiny teacher, a first compile) may take
# minutes; a barrier waits that long, unlike a device collective (gloo: 30 s).
BARRIER_TIMEOUT_S = 3600
EXIT_PEER_FAILED = 1


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> None:
  """Starts JAX's distributed runtime if this run has several processes; a no-op otherwise."""
  from uniemox_jax import errors  # pylint: disable=g-import-not-at-top
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise errors.UserError("--coordinator_address needs --num_processes and --process_id")
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
      # CPU devices of different processes talk through gloo (tests, CPU clusters).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               coordinator_bind_address=coordinator_address,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  elif _cluster_detected():
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
  else:
    return
  start_watchdog()


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


_barriers = []


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
  """Every process waits here until all arrive (a no-op with one process). Unlike a device
  collective, it tolerates long one-time work on one process. Every process passes the same
  barriers in the same order, so a counter makes each barrier's id unique."""
  if jax.process_count() == 1:
    return
  _barriers.append(name)
  _client().wait_at_barrier(f"uniemox/{len(_barriers)}/{name}",
                            timeout_in_ms=timeout_s * 1000)


def report_failure(message: str) -> None:
  """Tells every other process that this one failed with `message` (best effort). Process 0
  hosts the coordination service, and the others end without the message when it goes, so
  process 0 leaves last: failing, it waits (at most ACK_WAIT_S) until each other process has
  read the message."""
  client = _client() if jax.process_count() > 1 else None
  if client is None:
    return
  try:
    client.key_value_set(FAILURE_KEY, f"process {jax.process_index()}: {message}")
  except Exception:  # pylint: disable=broad-except
    return  # another process reported first, or the service is gone: exiting still ends us
  if jax.process_index() == 0:
    _wait_for_acks(client, {0})


def _wait_for_acks(client, exclude) -> None:
  others = [p for p in range(jax.process_count()) if p not in exclude]
  deadline = time.monotonic() + ACK_WAIT_S
  while others and time.monotonic() < deadline:
    still = []
    for p in others:
      try:
        client.key_value_try_get(f"{ACK_KEY}{p}")
      except Exception:  # pylint: disable=broad-except
        still.append(p)    # not yet
    others = still
    time.sleep(0.1)


def compile_together(jitted, *args, name: str):
  """`jitted` compiled for `args`, after which every process waits for the others: a step's
  first collective would otherwise time out on the process that compiled first (gloo waits
  30 s; compile times differ when one process hits the compilation cache and another does
  not, or one host is busier). With one process, `jitted` itself."""
  if jax.process_count() == 1:
    return jitted
  compiled = jitted.lower(*args).compile()
  barrier(f"{name} compiled")
  return compiled


def start_watchdog(poll_s: float = 1.0) -> None:
  """A daemon thread that ends this process when another one reports a failure. It polls
  (a short RPC a second) rather than blocking inside the C++ client, and stops before the
  interpreter exits: a thread parked in C++ at exit aborts the process."""
  client = _client()
  stop = threading.Event()

  def watch():
    me = f"process {jax.process_index()}:"
    while not stop.wait(poll_s):
      try:
        message = client.key_value_try_get(FAILURE_KEY)
      except Exception:  # pylint: disable=broad-except
        continue     # no failure reported (or the service is shutting down)
      if not message.startswith(me):
        try:
          client.key_value_set(f"{ACK_KEY}{jax.process_index()}", "1")
          if jax.process_index() == 0:     # the service's host leaves last
            failed = int(message.split(":")[0].split()[-1])
            _wait_for_acks(client, {0, failed})
        except Exception:  # pylint: disable=broad-except
          pass
        sys.stderr.write(f"\nstopping: {message}\n")
        sys.stderr.flush()
        logging.flush()
        os._exit(EXIT_PEER_FAILED)   # pylint: disable=protected-access
      return
  thread = threading.Thread(target=watch, name="uniemox-peer-watchdog", daemon=True)
  thread.start()

  def join():
    stop.set()
    thread.join(timeout=5 * poll_s)
  # Registered after jax.distributed's own shutdown hook, so it runs first (atexit is LIFO).
  atexit.register(join)

"""Multi-process start-up: `jax.distributed.initialize()` when a run spans several processes.

Explicit (flags, used by the tests and by hand-started multi-node runs) or automatic where
JAX detects the cluster: SLURM jobs with several tasks, TPU pod slices.
"""
from __future__ import annotations

import os
from typing import Optional

import jax


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Starts JAX's distributed runtime if this run has several processes; a no-op otherwise."""
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
      # CPU devices of different processes talk through gloo (tests, CPU clusters).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _cluster_detected():
    jax.distributed.initialize()

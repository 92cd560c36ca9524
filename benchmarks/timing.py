"""What the step benchmarks share: timing a jitted step and probing the largest batch."""
import time
from typing import Callable, Optional, Tuple

import jax


def time_step(step: Callable, state, args: Tuple, steps: int) -> Tuple[float, float]:
  """Compiles `step(state, *args, key)` (state donated), runs it once to warm up, then
  `steps` times; returns (seconds per step, FLOPs per step from XLA's cost analysis)."""
  fn = jax.jit(step, donate_argnums=(0,))
  compiled = fn.lower(state, *args, jax.random.key(2)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  state, loss = compiled(state, *args, jax.random.key(2))      # warm-up
  loss.block_until_ready()
  start = time.perf_counter()
  for i in range(steps):
    state, loss = compiled(state, *args, jax.random.key(3 + i))
  loss.block_until_ready()
  return (time.perf_counter() - start) / steps, flops


def largest_batch(run: Callable[[int], object], start: int, limit: int = 4096
                  ) -> Optional[int]:
  """The largest per-device batch, doubling from `start`, for which `run(batch)` does not
  run out of device memory."""
  best, size = None, start
  while size <= limit:
    try:
      run(size)
      best, size = size, size * 2
    except Exception as e:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
        break
      raise
  return best


def add_common_flags(parser) -> None:
  """The flags every step benchmark takes."""
  parser.add_argument("--vit", default="B/16,L/16")
  parser.add_argument("--batch", type=int, default=256, help="per device")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--peak_tflops", type=float, default=989.4,
                      help="the chip's dense bf16 peak, for MFU (H100/H200: 989.4)")
  parser.add_argument("--find_max_batch", action="store_true")

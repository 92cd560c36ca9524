"""What the step benchmarks share: timing a jitted step, probing the largest batch, flags."""
import dataclasses
import statistics
import sys
import time
from typing import Callable, List, Optional, Tuple

import jax


@dataclasses.dataclass
class StepTiming:
  compile_s: float            # lowering + compilation
  windows: List[float]        # seconds per step, one value per timed window
  xla_flops: float            # XLA's cost analysis of one step (0 where it gives none)

  @property
  def median(self) -> float:
    return statistics.median(self.windows)


def time_step(step: Callable, state, args: Tuple, steps: int, windows: int = 3) -> StepTiming:
  """Compiles `step(state, *args, key)` (state donated), runs it once to warm up, then times
  `windows` windows of `steps` steps each (the device is synchronized at each window's end)."""
  fn = jax.jit(step, donate_argnums=(0,))
  start = time.perf_counter()
  lowered = fn.lower(state, *args, jax.random.key(2))
  lowered_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  # Progress on stderr, so a run cut short by a time limit still shows where it was.
  print(f"  [lowered in {lowered_s:.1f} s, compiled in {compile_s - lowered_s:.1f} s]",
        file=sys.stderr, flush=True)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  state, loss = compiled(state, *args, jax.random.key(2))      # warm-up
  jax.block_until_ready(loss)
  times = []
  for w in range(windows):
    start = time.perf_counter()
    for i in range(steps):
      state, loss = compiled(state, *args, jax.random.key(3 + w * steps + i))
    jax.block_until_ready((state, loss))
    times.append((time.perf_counter() - start) / steps)
  return StepTiming(compile_s, times, flops)


def is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


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
      if is_out_of_memory(e):
        break
      raise
  return best


def add_common_flags(parser) -> None:
  """The flags every step benchmark takes."""
  parser.add_argument("--vit", default="B/16,L/16")
  parser.add_argument("--batch", type=int, default=256, help="per device")
  parser.add_argument("--image_size", type=int, default=224,
                      help="224 for every measurement; smaller only for CPU smoke runs")
  parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
  parser.add_argument("--windows", type=int, default=3, help="timed windows (median, min, max)")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--attention", default="auto",
                      help="comma-separated kernels to compare: auto, cudnn, xla")
  parser.add_argument("--remat", default="none",
                      help="remat policy: none, full, dots, dots_no_batch (+ encoder, decoder "
                           "for pretraining)")
  parser.add_argument("--scan", action="store_true", help="scan over blocks (faster compiles)")
  parser.add_argument("--peak_tflops", type=float, default=989.4,
                      help="the chip's dense bf16 peak, for MFU (H100/H200 SXM: 989.4)")
  parser.add_argument("--find_max_batch", action="store_true",
                      help="double the batch until memory runs out, then time the largest")


def format_row(name: str, batch: int, t: StepTiming, model_flops_per_image: float,
               peak_tflops: float, on_accelerator: bool, baseline_rate: float) -> str:
  """One table row: images/s (median of windows, with min-max), model and XLA TFLOP/s, MFU on
  the model FLOPs, compile time and the ratio to the baseline's images/s."""
  rate = batch / t.median
  lo, hi = batch / max(t.windows), batch / min(t.windows)
  model_tflops = model_flops_per_image * rate / 1e12
  xla_tflops = t.xla_flops / t.median / 1e12
  mfu = f"{model_tflops / peak_tflops:6.1%}" if on_accelerator else "     -"
  return (f"{name:34s} {batch:6d} {rate:9.1f} {lo:8.1f}-{hi:<8.1f} {model_tflops:8.2f} "
          f"{xla_tflops:8.2f} {mfu} {t.compile_s:8.1f} {rate / baseline_rate:7.2f}")


HEADER = (f"{'step':34s} {'batch':>6s} {'images/s':>9s} {'(min-max)':>17s} {'model TF/s':>8s} "
          f"{'XLA TF/s':>8s} {'MFU':>6s} {'compile s':>8s} {'ratio':>7s}")

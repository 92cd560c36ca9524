r"""A run's curves from WORKDIR/metrics.jsonl in one PNG, for those without TensorBoard (the
library and the panels: `uniemox_jax/curves.py`).

  python -m uniemox_jax.plots WORKDIR [--out curves.png]

Default output: WORKDIR/curves.png.
"""
from __future__ import annotations

from uniemox_jax import cli  # first: it quiets the libraries imported below

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from data_pipelines import storage  # noqa: E402
from uniemox_jax import curves  # noqa: E402
from uniemox_jax import errors  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "The PNG to write (default: WORKDIR/curves.png).")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("give one WORKDIR: python -m uniemox_jax.plots WORKDIR [--out F]")
  workdir = argv[1]
  rows = curves.read_metrics(storage.join(workdir, curves.METRICS))
  out = _OUT.value or storage.join(workdir, "curves.png")
  with errors.as_user_errors():
    storage.check_writable(storage.dirname(storage.absolute(out)))
  curves.plot(rows, out, f"{storage.absolute(workdir)} (steps {min(rows)}-{max(rows)})")
  print(f"{len(rows)} steps of {len(curves.panels(rows))} panels; wrote: "
        f"{storage.absolute(out)}")


if __name__ == "__main__":
  cli.run(main)

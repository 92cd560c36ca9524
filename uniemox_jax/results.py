r"""The table a paper reports, from finished fine-tuning workdirs.

  python -m uniemox_jax.results /ckpt/suite            # every workdir under it
  python -m uniemox_jax.results /ckpt/emo8-s0 /ckpt/emo8-s1 ... --out results/

Per benchmark (config.dataset): the test split's top-1 (mAP for multi-label data), top-3 and
macro F1 of each run's best validation state, as mean +- std over the seeds (the sample std,
n - 1; none for one seed) with the number of seeds, and the best-validation epoch. Written as
OUT/results.md (also printed), OUT/results.csv (one row per benchmark and metric, with every
seed's value) and OUT/results.png (the headline with error bars). Runs that cannot be
averaged are listed under the table with the reason, never averaged in: unfinished (no test
report of the best state), another pretrained encoder than the table's, another config than
their benchmark's other runs apart from the seed, or a seed already counted.

Exit codes: 0 written; 2 no finished run among the arguments (one line says why).
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from flax import traverse_util
import numpy as np

from data_pipelines import storage
from uniemox_jax import errors
from uniemox_jax import finetune
from uniemox_jax.evaluators import reports

# Config fields that do not change what a run computes: left out when runs are compared.
RUNTIME_FIELDS = ("seed", "data.workers", "compilation_cache_dir", "checkpoint", "profile",
                  "log_every_steps", "preemption_poll_steps", "eval_batch_size", "evals",
                  "mesh")
INIT_FIELDS = ("init.encoder", "init.encoder_format", "init.checkpoint")
# (report key, column title); the headline is mAP for multi-label data.
METRICS = (("top1", "test top-1 (%)"), ("mAP", "test mAP (%)"), ("top3", "test top-3 (%)"),
           ("macro_f1", "test macro F1 (%)"), ("epoch", "best-val epoch"))


def _flatten(tree: Dict[str, Any]) -> Dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep=".")


def find_workdirs(paths: Sequence[str]) -> List[str]:
  """The run workdirs named, or found below a named folder (up to three levels)."""
  found = []
  for path in paths:
    if not storage.isdir(path):
      raise FileNotFoundError(f"{path} is not a directory")
    level = [path]
    for _ in range(4):
      runs = [d for d in level if storage.exists(storage.join(d, "config.json"))]
      found += runs
      level = [storage.join(d, name) for d in level if d not in runs
               for name in sorted(storage.listdir(d)) if storage.isdir(storage.join(d, name))]
    if not any(f == path or f.startswith(path.rstrip("/") + "/") for f in found):
      raise FileNotFoundError(f"{path} holds no run (no config.json in it or below it)")
  return list(dict.fromkeys(found))


def read_run(workdir: str) -> Dict[str, Any]:
  """One workdir: its config, and its best state's test report, or why it has none."""
  config = storage.read_json(storage.join(workdir, "config.json"), missing=None) or {}
  run = {"workdir": workdir, "config": config, "dataset": config.get("dataset", "?"),
         "seed": config.get("seed"), "report": None, "problem": ""}
  if config.get("task") != "finetune":
    run["problem"] = f"not a fine-tuning run (task {config.get('task')!r})"
    return run
  best = storage.read_json(storage.join(workdir, finetune.BEST_FILE), missing=None)
  if not best:
    run["problem"] = "unfinished: no best.json (no validation yet)"
    return run
  split = config.get("test_split") or "test"
  path = finetune.test_report_file(workdir, best["step"], split)
  report = storage.read_json(path, missing=None)
  if report is None:
    run["problem"] = (f"unfinished: no {split} report of the best state (step {best['step']}) "
                      "yet; rerun its command to finish it")
    return run
  run["report"] = dict(report, epoch=best.get("epoch"), best_step=best["step"])
  return run


def _differences(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
  keys = sorted(set(a) | set(b))
  return [f"{k}={a.get(k)!r} (others {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]


def _comparable(config: Dict[str, Any]) -> Dict[str, Any]:
  flat = _flatten(config)
  return {k: v for k, v in flat.items()
          if not any(k == f or k.startswith(f + ".") for f in RUNTIME_FIELDS + INIT_FIELDS)}


def select(runs: List[Dict[str, Any]]) -> Tuple[Dict[str, List[Dict]], List[Dict]]:
  """({benchmark: the runs averaged}, the runs left out, each with its `problem`)."""
  left_out = [r for r in runs if r["problem"]]
  done = [r for r in runs if not r["problem"]]
  if not done:
    return {}, left_out
  inits = collections.Counter(
      tuple(_flatten(r["config"]).get(f) for f in INIT_FIELDS) for r in done)
  init = inits.most_common(1)[0][0]
  table: Dict[str, List[Dict]] = collections.defaultdict(list)
  for dataset in dict.fromkeys(r["dataset"] for r in done):
    group = [r for r in done if r["dataset"] == dataset]
    configs = collections.Counter(json.dumps(_comparable(r["config"]), sort_keys=True)
                                  for r in group)
    reference = json.loads(configs.most_common(1)[0][0])
    seeds: Dict[Any, str] = {}
    for r in group:
      own = tuple(_flatten(r["config"]).get(f) for f in INIT_FIELDS)
      diff = _differences(_comparable(r["config"]), reference)
      if own != init:
        r["problem"] = (f"another pretrained encoder: {own[0] or own[2]!r}, the table's is "
                        f"{init[0] or init[2]!r}")
      elif diff:
        r["problem"] = (f"its config differs from the other {dataset} runs' apart from the "
                        f"seed: {'; '.join(diff[:3])}" + (" ..." if len(diff) > 3 else ""))
      elif r["seed"] in seeds:
        r["problem"] = f"seed {r['seed']} is already counted ({seeds[r['seed']]})"
      else:
        seeds[r["seed"]] = r["workdir"]
        table[dataset].append(r)
        continue
      left_out.append(r)
  return dict(table), left_out


def summarize(table: Dict[str, List[Dict]]) -> List[Dict[str, Any]]:
  """One row per benchmark and metric: n, mean, std (sample; None for one seed), values."""
  rows = []
  for dataset, runs in table.items():
    for key, title in METRICS:
      values = [r["report"].get(key) for r in runs]
      if any(v is None for v in values):
        continue
      arr = np.asarray(values, np.float64)
      rows.append({"benchmark": dataset, "metric": key, "title": title, "n": len(arr),
                   "mean": float(arr.mean()),
                   "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
                   "seeds": [r["seed"] for r in runs], "values": [float(v) for v in arr]})
  return rows


def _cell(row: Optional[Dict[str, Any]]) -> str:
  if row is None:
    return "-"
  scale, digits = (1.0, 1) if row["metric"] == "epoch" else (100.0, 2)
  mean = f"{row['mean'] * scale:.{digits}f}"
  return mean if row["std"] is None else f"{mean} ± {row['std'] * scale:.{digits}f}"


def markdown(rows: List[Dict[str, Any]], left_out: List[Dict[str, Any]]) -> str:
  benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
  keys = [k for k, _ in METRICS if any(r["metric"] == k for r in rows)]
  titles = dict(METRICS)
  lines = ["| benchmark | seeds | " + " | ".join(titles[k] for k in keys) + " |",
           "|---|---|" + "---|" * len(keys)]
  for b in benchmarks:
    mine = {r["metric"]: r for r in rows if r["benchmark"] == b}
    n = next(iter(mine.values()))["n"]
    lines.append(f"| {b} | {n} | " + " | ".join(_cell(mine.get(k)) for k in keys) + " |")
  lines.append("")
  lines.append("mean ± sample std over the seeds, test split, each run's best validation state.")
  if left_out:
    lines += ["", "Not averaged:", ""]
    lines += [f"- {r['workdir']} ({r['dataset']}, seed {r['seed']}): {r['problem']}"
              for r in left_out]
  return "\n".join(lines) + "\n"


def write_csv(rows: List[Dict[str, Any]]) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["benchmark", "metric", "n", "mean", "std", "seeds", "values"])
  for r in rows:
    writer.writerow([r["benchmark"], r["metric"], r["n"], repr(r["mean"]),
                     "" if r["std"] is None else repr(r["std"]),
                     " ".join(map(str, r["seeds"])), " ".join(map(repr, r["values"]))])
  return out.getvalue()


def plot(rows: List[Dict[str, Any]], path: str) -> None:
  """The headline (top-1, or mAP) per benchmark in %, with the std as error bars."""
  plt = reports.pyplot()
  head = [r for r in rows if r["metric"] in ("top1", "mAP")]
  fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(head) + 2), 4.2))
  x = np.arange(len(head))
  means = [100 * r["mean"] for r in head]
  errs = [100 * (r["std"] or 0.0) for r in head]
  ax.bar(x, means, yerr=errs, capsize=6, color="#4C72B0")
  for i, r in enumerate(head):
    ax.annotate(f"{means[i]:.1f}\nn={r['n']}", (i, means[i] + errs[i]),
                textcoords="offset points", xytext=(0, 4), ha="center", fontsize=9)
  ax.set_xticks(x, labels=[f"{r['benchmark']}\n({'mAP' if r['metric'] == 'mAP' else 'top-1'})"
                           for r in head])
  ax.set_ylabel("test (%)")
  ax.set_ylim(0, min(100, max(m + e for m, e in zip(means, errs)) * 1.25 + 1))
  ax.set_title("mean ± std over seeds")
  fig.tight_layout()
  reports.save_figure(fig, path)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description="The paper's table from finished fine-tuning runs.",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__)
  p.add_argument("workdirs", nargs="+", help="run workdirs, or folders holding them")
  p.add_argument("--out", default="", help="where results.{md,csv,png} go (default: the "
                 "first argument)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  runs = [read_run(w) for w in find_workdirs(args.workdirs)]
  table, left_out = select(runs)
  text = markdown(summarize(table), left_out) if table else ""
  if not table:
    print("\n".join(f"{r['workdir']}: {r['problem']}" for r in left_out), file=sys.stderr)
    print(f"error: no finished fine-tuning run among {len(runs)} workdir(s)", file=sys.stderr)
    return 2
  rows = summarize(table)
  out = args.out or args.workdirs[0]
  storage.makedirs(out)
  files = {name: storage.join(out, f"results.{name}") for name in ("md", "csv", "png")}
  storage.write_text(files["md"], text)
  storage.write_text(files["csv"], write_csv(rows))
  plot(rows, files["png"])
  print(text)
  print(f"wrote: {', '.join(files.values())}")
  return 0


if __name__ == "__main__":
  errors.run_command(main)

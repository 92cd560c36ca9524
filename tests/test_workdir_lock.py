"""One owner per workdir (uniemox_jax/workdir_lock.py), on a local disk: of many takers racing
for a free or a stale lock exactly one wins. Real runs on one workdir: test_lifecycle.py; a
bucket: test_cloud_storage.py."""
import concurrent.futures
import json
import os
import socket
import subprocess
import sys

import pytest

from uniemox_jax import errors
from uniemox_jax import workdir_lock


def _race(workdir, n=8):
  """n takers at once: (how many won, the messages of those refused)."""
  def take(_):
    try:
      workdir_lock.WorkdirLock(workdir).acquire()
      return None
    except errors.UserError as e:
      return str(e)
  with concurrent.futures.ThreadPoolExecutor(n) as pool:
    outcomes = list(pool.map(take, range(n)))
  return outcomes.count(None), [o for o in outcomes if o is not None]


def test_one_of_many_takers_wins_a_free_lock(tmp_path):
  won, refused = _race(str(tmp_path))
  assert won == 1 and len(refused) == 7
  assert all("the workdir is in use by another run" in r for r in refused), refused


def test_one_of_many_takers_wins_a_stale_lock(tmp_path):
  dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True).stdout)
  stale = workdir_lock.Holder(host=socket.gethostname(), pid=dead, started="earlier",
                              command="python -m uniemox_jax.main", boot_id=workdir_lock._boot_id())
  with open(tmp_path / workdir_lock.LOCK_FILE, "w") as f:
    json.dump(stale.__dict__, f)
  # Each taker that finds the stale lock removes it only under the workdir's flock, so a later
  # one finds the winner's lock instead of removing it too.
  won, refused = _race(str(tmp_path))
  assert won == 1 and len(refused) == 7, refused
  holder = json.load(open(tmp_path / workdir_lock.LOCK_FILE))
  assert holder["pid"] == os.getpid()


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path):
  """The holder's pid now belongs to another program (this test process, started at another
  time): the lock is stale."""
  me = workdir_lock.Holder.this_process()
  reused = workdir_lock.Holder(**dict(me.__dict__, start_ticks=str(int(me.start_ticks) - 1)))
  assert not reused.alive() and me.alive()
  with open(tmp_path / workdir_lock.LOCK_FILE, "w") as f:
    json.dump(reused.__dict__, f)
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  lock.acquire()
  lock.release()
  assert not os.path.exists(tmp_path / workdir_lock.LOCK_FILE)


def test_an_unreadable_lock_needs_force_unlock(tmp_path):
  (tmp_path / workdir_lock.LOCK_FILE).write_text("{half written")
  with pytest.raises(errors.UserError, match="locked by an unreadable lock file.*--force_unlock"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  workdir_lock.WorkdirLock(str(tmp_path), force=True).acquire()

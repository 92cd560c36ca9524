"""Each loss against an independent NumPy computation of docs/method.md §3's formula."""
import jax.numpy as jnp
import numpy as np
import pytest

from uniemox_jax import losses
from uniemox_jax import objective


def _rand(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float64)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_l1(g, omega, lam, s):
  a = s * _unit(g) @ _unit(lam).T
  c = s * _unit(omega) @ _unit(lam).T
  cos = [a[i] @ c[i] / (np.linalg.norm(a[i]) * np.linalg.norm(c[i])) for i in range(len(a))]
  return 1.0 - np.mean(cos)


def test_l1_matches_numpy_and_ignores_logit_scale():
  g, omega, lam = _rand(0, 6, 32), _rand(1, 6, 32), _rand(2, 6, 32)
  for s in (1.0, 14.3, 100.0):
    got = losses.similarity_distillation_loss(jnp.asarray(g), jnp.asarray(omega),
                                              jnp.asarray(lam), s)
    np.testing.assert_allclose(got, _np_l1(g, omega, lam, s), rtol=1e-5, atol=1e-6)
  ref = losses.similarity_distillation_loss(g, omega, lam, 1.0)
  np.testing.assert_allclose(losses.similarity_distillation_loss(g, omega, lam, 100.0), ref,
                             rtol=1e-5, atol=1e-6)


def test_l1_uses_the_whole_batch():
  """Changing one example's text changes every row of the B x B logits, so the loss."""
  g, omega, lam = _rand(0, 6, 32), _rand(1, 6, 32), _rand(2, 6, 32)
  lam2 = lam.copy()
  lam2[5] = _rand(3, 32)
  assert abs(_np_l1(g, omega, lam, 1) - _np_l1(g, omega, lam2, 1)) > 1e-4
  np.testing.assert_allclose(losses.similarity_distillation_loss(g, omega, lam2),
                             _np_l1(g, omega, lam2, 1), rtol=1e-5, atol=1e-6)


def test_l2_matches_numpy_and_is_zero_for_identical():
  g, omega = _rand(4, 5, 16), _rand(5, 5, 16)
  expect = 1.0 - np.mean(np.sum(_unit(g) * _unit(omega), axis=1))
  np.testing.assert_allclose(losses.embedding_cosine_loss(g, omega), expect, rtol=1e-5)
  np.testing.assert_allclose(losses.embedding_cosine_loss(g, 3.0 * g), 0.0, atol=1e-6)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_l3_matches_numpy(norm_pix):
  pred, patches = _rand(6, 3, 10, 12), _rand(7, 3, 10, 12)
  mask = (np.random.default_rng(8).random((3, 10)) < 0.7).astype(np.float64)
  target = patches
  if norm_pix:
    target = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(
        patches.var(-1, keepdims=True, ddof=1) + 1e-6)
  per_patch = ((pred - target) ** 2).mean(-1)
  expect = (per_patch * mask).sum() / mask.sum()
  got = losses.masked_reconstruction_loss(
      pred, losses.reconstruction_target(jnp.asarray(patches), norm_pix), mask)
  np.testing.assert_allclose(got, expect, rtol=1e-5)


def test_total_switches_terms_and_rejects_unknown():
  terms = {"l1": jnp.float32(0.5), "l2": jnp.float32(0.25), "l3": jnp.float32(2.0)}
  assert float(objective.total_loss(terms, {"l1": 1, "l2": 1, "l3": 1})) == 2.75
  assert float(objective.total_loss(terms, {"l1": 1, "l2": 0, "l3": 0.5})) == 1.5
  with pytest.raises(ValueError, match="unknown terms"):
    objective.total_loss(terms, {"l4": 1.0})


def test_norm_pix_target_is_maes():
  """MAE's forward_loss: mean and torch's default (unbiased) variance per patch."""
  import torch
  patches = _rand(9, 2, 5, 48)
  t = torch.from_numpy(patches)
  mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
  expect = ((t - mean) / (var + 1.e-6) ** .5).numpy()
  np.testing.assert_allclose(losses.reconstruction_target(jnp.asarray(patches), True), expect,
                             rtol=1e-5, atol=1e-5)


def test_l1_device_groups_equal_each_devices_own_l1_averaged():
  """l1_group=device on a batch sharded over 8 devices: the jitted loss equals computing L1
  on each device's rows alone (the reference's per-GPU L1) and averaging."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  devices = jax.devices()
  assert len(devices) == 8
  rows = objective.l1_group_size("device", micro_batch=24, devices=len(devices))
  assert rows == 3
  mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
  shard = NamedSharding(mesh, PartitionSpec("batch"))
  g, omega, lam = _rand(3, 24, 16), _rand(4, 24, 16), _rand(5, 24, 16)
  placed = [jax.device_put(jnp.asarray(x, jnp.float32), shard) for x in (g, omega, lam)]
  got = jax.jit(lambda a, b, c: losses.similarity_distillation_loss(a, b, c, 50.0, rows))(
      *placed)
  per_device = []
  for d in range(8):
    (rows_d,) = [s.index[0] for s in placed[0].addressable_shards if s.device == devices[d]]
    per_device.append(_np_l1(g[rows_d], omega[rows_d], lam[rows_d], 50.0))
  np.testing.assert_allclose(got, np.mean(per_device), rtol=1e-5, atol=1e-6)
  # Global differs (the matrix spans all 24 rows), and equals group size 0 or 24.
  full = losses.similarity_distillation_loss(g, omega, lam, 50.0)
  np.testing.assert_allclose(full, _np_l1(g, omega, lam, 50.0), rtol=1e-5, atol=1e-6)
  assert abs(float(full) - float(got)) > 1e-4
  np.testing.assert_allclose(losses.similarity_distillation_loss(g, omega, lam, 50.0, 24),
                             full, rtol=1e-6)


def test_l1_group_values_are_checked():
  assert objective.l1_group_size("global", 64, 8) == 0
  assert objective.l1_group_size("16", 64, 8) == 16
  with pytest.raises(ValueError, match=r"l1_group=24: groups of 24 rows do not divide the 64"):
    objective.l1_group_size("24", 64, 8)
  with pytest.raises(ValueError, match=r"l1_group='gpu': choose global, device or"):
    objective.l1_group_size("gpu")

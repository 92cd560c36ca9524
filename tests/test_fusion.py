"""Every registered fusion runs, keeps the width and is differentiable in all its params."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniemox_jax.models import fusion


@pytest.mark.parametrize("name", sorted(fusion.FUSIONS))
def test_fusion_runs_and_is_differentiable(name):
  alpha = jax.random.normal(jax.random.key(0), (4, 32))
  beta = jax.random.normal(jax.random.key(1), (4, 32))
  module = fusion.get_fusion(name)(heads=4)
  params = nn.unbox(module.init(jax.random.key(2), alpha, beta)).get("params", {})
  gamma = module.apply({"params": params}, alpha, beta)
  assert gamma.shape == (4, 32) and np.all(np.isfinite(gamma))

  probe = jax.random.normal(jax.random.key(3), gamma.shape)

  def loss(p, a, b):
    return jnp.sum(module.apply({"params": p}, a, b) * probe)
  g_params, g_alpha, g_beta = jax.grad(loss, argnums=(0, 1, 2))(params, alpha, beta)
  for path, g in jax.tree_util.tree_flatten_with_path(g_params)[0]:
    assert np.all(np.isfinite(g)) and np.any(g != 0), (name, path)
  assert np.any(g_alpha != 0)
  if name == "none":
    assert not params and np.all(g_beta == 0)   # fusion off: gamma is alpha
  else:
    assert np.any(g_beta != 0)


def test_easy_fusion_formula():
  alpha = jax.random.normal(jax.random.key(0), (3, 8))
  beta = jax.random.normal(jax.random.key(1), (3, 8))
  module = fusion.EasyFusion()
  params = nn.unbox(module.init(jax.random.key(2), alpha, beta))["params"]
  assert set(params) == {"norm", "proj"}     # one LayerNorm shared by both tokens
  np.testing.assert_array_equal(params["proj"]["bias"], 0.0)

  def ln(x):      # torch.nn.LayerNorm's default epsilon, as the reference module has it
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  h = ln(np.asarray(alpha)) + ln(np.asarray(beta))
  z = h @ np.asarray(params["proj"]["kernel"])
  expect = np.where(z > 0, z, np.expm1(z))
  np.testing.assert_allclose(module.apply({"params": params}, alpha, beta), expect,
                             rtol=1e-5, atol=1e-5)


def test_unknown_fusion_names_the_config_field():
  with pytest.raises(ValueError, match="config.model.fusion='bogus'"):
    fusion.get_fusion("bogus")


def test_easy_fusion_equals_the_torch_module_where_epsilon_shows():
  """The reference's easy fusion in torch (one nn.LayerNorm with its default eps 1e-5, a
  Linear, ELU) on inputs of small spread, where the epsilon changes the output."""
  import torch
  alpha = np.asarray(jax.random.normal(jax.random.key(3), (4, 8))) * 3e-3
  beta = np.asarray(jax.random.normal(jax.random.key(4), (4, 8))) * 3e-3
  module = fusion.EasyFusion()
  params = nn.unbox(module.init(jax.random.key(2), alpha, beta))["params"]
  norm, proj = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
  with torch.no_grad():
    proj.weight.copy_(torch.from_numpy(np.array(params["proj"]["kernel"]).T))
    proj.bias.copy_(torch.from_numpy(np.array(params["proj"]["bias"])))
    ref = torch.nn.functional.elu(proj(norm(torch.from_numpy(alpha).float()) +
                                       norm(torch.from_numpy(beta).float()))).numpy()
  np.testing.assert_allclose(module.apply({"params": params}, alpha, beta), ref,
                             rtol=1e-4, atol=1e-4)

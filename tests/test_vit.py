"""ViT encoder: published sizes, position embeddings, scan/remat equivalence, dtypes, axes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from uniemox_jax import sharding
from uniemox_jax.models import vit


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_params(module, image_size=224):
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return nn.unbox(jax.eval_shape(module.init, jax.random.key(0), images)["params"])


# Published totals of timm's vit_base_patch16_224 / vit_large_patch16_224 (the MAE
# architecture): 86,567,656 and 304,326,632 parameters. Those include a 1000-class head and a
# learned 197-token position embedding, which our encoder does not have (sin-cos is fixed).
@pytest.mark.parametrize("variant,published,width", [
    ("B/16", 86_567_656, 768),
    ("L/16", 304_326_632, 1024),
])
def test_encoder_parameter_count_matches_published(variant, published, width):
  head = width * 1000 + 1000
  learned_posemb = 197 * width
  params = _abstract_params(vit.Encoder(variant))
  assert _count(params) == published - head - learned_posemb


def test_decode_variant():
  assert vit.decode_variant("L/16") == vit.VitShape(1024, 24, 16, 4096, 16)
  assert vit.decode_variant("H/14").patch == 14
  for bad in ("L16", "Q/16", "", "L/x"):
    with pytest.raises(ValueError, match="Unknown ViT variant"):
      vit.decode_variant(bad)


def test_sincos_2d_layout():
  dim, gs = 16, 3
  emb = vit.sincos_2d(dim, gs, cls_token=True)
  assert emb.shape == (1 + gs * gs, dim)
  np.testing.assert_array_equal(emb[0], 0.0)
  quarter = dim // 4
  omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
  for row in range(gs):
    for col in range(gs):
      e = emb[1 + row * gs + col]
      # First half: column index (sin then cos); second half: row index.
      np.testing.assert_allclose(e[:quarter], np.sin(col * omega), atol=1e-6)
      np.testing.assert_allclose(e[quarter:2 * quarter], np.cos(col * omega), atol=1e-6)
      np.testing.assert_allclose(e[2 * quarter:3 * quarter], np.sin(row * omega), atol=1e-6)
      np.testing.assert_allclose(e[3 * quarter:], np.cos(row * omega), atol=1e-6)


def _tiny_images(batch=2, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def _stack_blocks(params, depth):
  """Unrolled params (transformer/block_i) -> the scanned layout (transformer/blocks)."""
  flat = traverse_util.flatten_dict(params)
  out, stacked = {}, {}
  for path, value in flat.items():
    if len(path) > 1 and path[1].startswith("block_"):
      stacked.setdefault((path[0], "blocks") + path[2:], {})[int(path[1][6:])] = value
    else:
      out[path] = value
  for path, per_layer in stacked.items():
    out[path] = jnp.stack([per_layer[i] for i in range(depth)])
  return traverse_util.unflatten_dict(out)


def test_scan_and_remat_match_unrolled():
  images = _tiny_images()
  plain = vit.Encoder("mu/8", image_size=32)
  params = nn.unbox(plain.init(jax.random.key(1), images)["params"])
  ref, _ = plain.apply({"params": params}, images)
  scanned = vit.Encoder("mu/8", image_size=32, student=vit.StudentConfig(scan=True, remat=True))
  scan_params = _stack_blocks(params, depth=2)
  assert jax.tree.structure(scan_params) == jax.tree.structure(
      nn.unbox(scanned.init(jax.random.key(1), images)["params"]))
  out, _ = scanned.apply({"params": scan_params}, images)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

  # A random projection: sum(out ** 2) would be ~constant after the final LayerNorm, and its
  # near-zero gradient all float32 rounding.
  probe = jax.random.normal(jax.random.key(7), ref.shape)

  def loss(p, module):
    return jnp.sum(module.apply({"params": p}, images)[0] * probe)
  g_ref = _stack_blocks(jax.grad(loss)(params, plain), depth=2)
  g_scan = jax.grad(loss)(scan_params, scanned)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               g_ref, g_scan)


def test_bf16_compute_keeps_fp32_params():
  images = _tiny_images()
  enc = vit.Encoder("mu/8", image_size=32, student=vit.StudentConfig(dtype=jnp.bfloat16))
  variables = enc.init(jax.random.key(0), images)
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype(jnp.float32)}
  tokens, aux = enc.apply(variables, images)
  assert tokens.dtype == jnp.bfloat16 and aux["cls"].shape == (2, 64)


def test_masked_input_and_drop_path():
  images = _tiny_images(batch=4)
  enc = vit.Encoder("mu/8", image_size=32, student=vit.StudentConfig(drop_path=0.5))
  params = enc.init(jax.random.key(0), images)
  ids_keep = jnp.tile(jnp.arange(0, 16, 4, dtype=jnp.int32)[None], (4, 1))
  tokens, _ = enc.apply(params, images, ids_keep)
  assert tokens.shape == (4, 1 + 4, 64)
  # Evaluation is deterministic; training draws per-sample drop path from the "dropout" key.
  np.testing.assert_array_equal(enc.apply(params, images)[0], enc.apply(params, images)[0])
  a = enc.apply(params, images, train=True, rngs={"dropout": jax.random.key(1)})[0]
  b = enc.apply(params, images, train=True, rngs={"dropout": jax.random.key(2)})[0]
  assert not np.allclose(a, b)


def test_wrong_image_size_is_reported():
  with pytest.raises(ValueError, match=r"expects \[B, 32, 32, 3\]"):
    vit.Encoder("mu/8", image_size=32).init(jax.random.key(0), _tiny_images(size=48))


def test_logical_axes_shard_params_over_fsdp():
  images = _tiny_images(batch=8)
  enc = vit.Encoder("mu/8", image_size=32)
  abstract = jax.eval_shape(enc.init, jax.random.key(0), images)["params"]
  # Every parameter carries one logical name per dimension.
  for path, leaf in traverse_util.flatten_dict(abstract, sep="/").items():
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    assert len(leaf.names) == len(leaf.value.shape), path
  mesh = sharding.make_mesh(data=2, fsdp=4)
  shardings = sharding.param_shardings(abstract, mesh)
  params = jax.jit(lambda k: nn.unbox(enc.init(k, images)["params"]),
                   out_shardings=shardings)(jax.random.key(0))
  fc1 = params["transformer"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  # Each fsdp shard holds a quarter of the embed axis.
  assert fc1.addressable_shards[0].data.shape == (64 // 4, 128)
  out = jax.jit(lambda p, x: enc.apply({"params": p}, x)[0],
                in_shardings=(shardings, sharding.batch_sharding(mesh)))(params, images)
  ref = enc.apply({"params": jax.device_get(params)}, images)[0]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_make_mesh_errors_name_the_config():
  with pytest.raises(ValueError, match="fsdp=3 does not divide the 8 devices"):
    sharding.make_mesh(fsdp=3)
  assert sharding.make_mesh().shape == {"data": 8, "fsdp": 1}

"""Tests for the denoisers (jaxdiff.models): shapes, conditioning, RNG contract, dtypes, configs.

Models come from configs/tiny.py (behaviour tests use an even smaller one-level U-Net). The run
time is almost all tracing and XLA compilation, so: models are built abstractly once per config
and filled with NumPy random parameters (`_random_model`; DDPM and DiT zero-initialise their
output layers, so with the real init the output would be identically zero anyway), forward
passes run under a cached jit (`_apply`), and test jits skip XLA's backend optimisations.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cifar10, tiny
from jaxdiff.models import Apply, bind, build_model, count_params, dit_preset, layers, param_table


def _config(**overrides):
  """The tiny config with ``section__field=value`` overrides."""
  config = tiny.get_config()
  for name, value in overrides.items():
    section, field = name.split("__")
    setattr(getattr(config, section), field, value)
  return config


_ABSTRACT_MODELS = {}


def _abstract_model(config):
  """(graphdef, abstract state) of the model for ``config``; built once per distinct config."""
  key = config.to_json()
  if key not in _ABSTRACT_MODELS:
    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    _ABSTRACT_MODELS[key] = nnx.split(model)
  return _ABSTRACT_MODELS[key]


def _random_model(config, seed=0):
  """The model for ``config`` with random, non-zero parameters.

  The structure comes from an abstract build (nnx.eval_shape, cached per config) and the
  values from NumPy: initialising eagerly with jax.random compiles one RNG kernel per parameter
  shape, which would dominate the run time. The values are scaled like a sensible init (unit
  fan-in variance, norm scales near 1) but nothing is zero, so the zero-initialised output
  layers of DDPM and DiT do not hide the effect of the inputs.
  """
  graphdef, state = _abstract_model(config)
  rng = np.random.default_rng(seed)

  def init(path, p):
    name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    noise = rng.standard_normal(p.shape)
    if name == "scale":
      value = 1.0 + 0.1 * noise
    elif name == "kernel":
      value = noise / math.sqrt(math.prod(p.shape[:-1]))
    else:  # biases, embedding tables
      value = 0.1 * noise
    return jnp.asarray(value, p.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


def _inputs(config, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  size, channels = config.data.image_size, config.data.channels
  x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
  t = jnp.asarray(rng.integers(0, config.diffusion.num_timesteps, (batch,)), jnp.int32)
  return x, t


# The tiny models run in microseconds; XLA's CPU backend optimisations only double the compile
# time, so test jits skip them (results are the same up to float rounding).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _jitted_forward(graphdef):
  def forward(params, x, t, y, key):
    return nnx.merge(graphdef, params)(x, t, y, key=key)

  return jax.jit(forward, compiler_options=FAST_COMPILE)


def _apply(model, x, t, y=None, *, key=None):
  """``model(x, t, y, key=key)`` under jit: one compile per model structure (and per
  None-ness of y and key), where eager execution would compile every op separately."""
  graphdef, params = nnx.split(model)
  return _jitted_forward(graphdef)(params, x, t, y, key)


# Behaviour tests: a one-level U-Net (half the compile time of tiny's two levels, attention
# included) and tiny's DiT.
ONE_LEVEL = {"model__ch_mult": (1,), "model__attn_resolutions": (8,)}
ARCHS = {"unet": ONE_LEVEL, "dit": {"model__name": "dit"}}

# Each case combines a few options so the matrix stays small (one compile per case).
VARIANTS = {
  "ddpm_1ch": {},
  "biggan_scaleshift_multihead_learnedvar": {
    "model__resblock": "biggan",
    "model__scale_shift_norm": True,
    "model__num_head_channels": 16,
    "diffusion__var_type": "learned_range",
  },
  "convnext_linearattn_rgb": {
    "model__resblock": "convnext",
    "model__attention": "linear",
    "model__num_heads": 2,
    "data__channels": 3,
  },
  "size28_avgpool_classcond_remat": {
    "data__image_size": 28,
    "model__ch_mult": (1, 2, 2),
    "model__attn_resolutions": (14,),
    "model__resample_with_conv": False,
    "model__class_conditional": True,
    "model__remat": True,
  },
  "dit": {"model__name": "dit"},
  "dit_rgb_28_multihead_learnedvar": {
    "model__name": "dit",
    "data__image_size": 28,
    "data__channels": 3,
    "model__num_heads": 2,
    "diffusion__var_type": "learned",
  },
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_shape_and_dtype(variant):
  config = _config(**VARIANTS[variant])
  x, t = _inputs(config)
  out = _apply(_random_model(config), x, t)
  learned = config.diffusion.var_type in ("learned", "learned_range")
  c = config.data.channels * (2 if learned else 1)
  chex.assert_shape(out, x.shape[:3] + (c,))
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)


def test_bind_is_the_model_with_its_params_as_jit_arguments():
  config = _config(**ONE_LEVEL)
  x, t = _inputs(config)
  model = _random_model(config)
  graphdef, params = nnx.split(model)
  fn = bind(graphdef, params)
  assert isinstance(fn, jax.tree_util.Partial)
  chex.assert_trees_all_close(fn(x, t), _apply(model, x, t), atol=1e-5, rtol=1e-5)  # eager vs jit
  # Two binds of one architecture share a jitted caller's compiled code; the params are leaves.
  assert Apply(graphdef) == fn.func and hash(Apply(graphdef)) == hash(fn.func)
  traced = jax.jit(chex.assert_max_traces(n=1)(lambda f, x, t: f(x, t)))
  zeros = jax.tree.map(jnp.zeros_like, params)
  traced(fn, x, t)
  out0 = traced(bind(graphdef, zeros), x, t)
  chex.assert_trees_all_close(out0, jnp.zeros_like(out0))


def test_scalar_timestep_is_broadcast():
  chex.assert_trees_all_equal(layers.batch_timesteps(jnp.int32(3), 2), jnp.array([3, 3]))
  with pytest.raises(ValueError, match="t must have shape"):
    layers.batch_timesteps(jnp.zeros((3,), jnp.int32), 2)


@pytest.mark.parametrize(
  "arch, zero_init",
  [
    (ONE_LEVEL, ("conv_out",)),
    (
      {"model__name": "dit", "model__depth": 1},
      ("final_linear", "final_ada_ln", "blocks.0.ada_ln"),
    ),
  ],
  ids=list(ARCHS),
)
def test_real_init_is_params_only_with_zero_output_layer(arch, zero_init):
  config = _config(model__dropout=0.1, model__class_conditional=True, **arch)
  # The real (eager) init path; an rbg key only because it compiles faster than threefry.
  model = build_model(config, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  # The contract with training code: nnx.split gives float32 parameter arrays, no RNG state.
  _, params, rest = nnx.split(model, nnx.Param, ...)
  assert not jax.tree.leaves(rest)
  for leaf in jax.tree.leaves(params):
    chex.assert_type(leaf, jnp.float32)
  # DDPM zero-initialises conv_out and DiT its final layer and adaLN ("adaLN-Zero"), so the
  # untrained model outputs exactly 0.
  flat = {".".join(str(k) for k in path): v for path, v in nnx.to_flat_state(params)}
  for module in zero_init:
    zeros = [v for name, v in flat.items() if name.startswith(module + ".")]
    assert zeros and all(not jnp.any(v[...]) for v in zeros), module


@pytest.mark.parametrize("arch", list(ARCHS))
def test_timestep_changes_output(arch):
  config = _config(**ARCHS[arch])
  model = _random_model(config)
  x, _ = _inputs(config)
  out0 = _apply(model, x, jnp.array([0, 0]))
  out1 = _apply(model, x, jnp.array([7, 7]))
  assert float(jnp.abs(out0 - out1).max()) > 1e-3


# Label dropout only acts with a key, so these tests share one config (and its compiles).
CLASS_COND = {"model__class_conditional": True, "model__class_dropout": 1.0}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_class_label_changes_output_and_none_is_null_class(arch):
  config = _config(**CLASS_COND, **ARCHS[arch])
  model = _random_model(config)
  x, t = _inputs(config)
  out_a = _apply(model, x, t, jnp.array([0, 1]))
  out_b = _apply(model, x, t, jnp.array([2, 3]))
  assert float(jnp.abs(out_a - out_b).max()) > 1e-3
  null = jnp.full((2,), config.data.num_classes)
  chex.assert_trees_all_close(_apply(model, x, t, None), _apply(model, x, t, null), atol=0, rtol=0)


def test_label_dropout_only_with_key():
  config = _config(**CLASS_COND, **ONE_LEVEL)
  model = _random_model(config)
  x, t = _inputs(config)
  y = jnp.array([0, 1])
  unconditional = _apply(model, x, t, None)
  # Probability-1 label dropout turns every label into the null class, but only in training.
  chex.assert_trees_all_close(
    _apply(model, x, t, y, key=jax.random.key(3)), unconditional, atol=1e-6
  )
  assert float(jnp.abs(_apply(model, x, t, y) - unconditional).max()) > 1e-3


@pytest.mark.parametrize("arch", list(ARCHS))
def test_labels_on_unconditional_model_raise(arch):
  config = _config(**ARCHS[arch])
  model = _random_model(config)
  x, t = _inputs(config)
  with pytest.raises(ValueError, match="unconditional model"):
    _apply(model, x, t, jnp.array([0, 1]))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dropout_only_with_key(arch):
  config = _config(model__dropout=0.5, **ARCHS[arch])
  model = _random_model(config)
  x, t = _inputs(config)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  chex.assert_trees_all_close(_apply(model, x, t), _apply(model, x, t), atol=0, rtol=0)
  chex.assert_trees_all_close(
    _apply(model, x, t, key=k1), _apply(model, x, t, key=k1), atol=0, rtol=0
  )
  assert float(jnp.abs(_apply(model, x, t, key=k1) - _apply(model, x, t)).max()) > 1e-3
  assert float(jnp.abs(_apply(model, x, t, key=k1) - _apply(model, x, t, key=k2)).max()) > 1e-3


def _loss_and_grads(model, x, t, key):
  graphdef, params = nnx.split(model)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def loss_and_grad(params, x, t, key):
    def loss(params):
      return jnp.mean(nnx.merge(graphdef, params)(x, t, key=key) ** 2)

    return jax.value_and_grad(loss)(params)

  return loss_and_grad(params, x, t, key)


def test_unet_gradients_finite_and_nonzero():
  config = _config(model__dropout=0.1, **ARCHS["unet"])
  model = _random_model(config)
  x, t = _inputs(config)
  loss, grads = _loss_and_grads(model, x, t, jax.random.key(0))
  chex.assert_tree_all_finite((loss, grads))
  assert count_params(grads) == count_params(model)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_dit_gradients_finite_and_nonzero():
  config = _config(model__dropout=0.1, model__class_conditional=True, **ARCHS["dit"])
  model = _random_model(config)
  x, t = _inputs(config)
  loss, grads = _loss_and_grads(model, x, t, jax.random.key(0))
  chex.assert_tree_all_finite((loss, grads))
  assert count_params(grads) == count_params(model)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_remat_leaves_values_and_gradients_unchanged(arch):
  config = _config(model__dropout=0.1, **ARCHS[arch])
  x, t = _inputs(config)
  key = jax.random.key(0)
  expected = _loss_and_grads(_random_model(config), x, t, key)
  config.model.remat = True
  got = _loss_and_grads(_random_model(config), x, t, key)  # same seed, same parameters
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)


def test_jitted_forward_traces_once():
  config = _config(**CLASS_COND, **ONE_LEVEL)
  graphdef, params = nnx.split(_random_model(config))

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  @chex.assert_max_traces(n=1)
  def forward(params, x, t, y):
    return nnx.merge(graphdef, params)(x, t, y)

  x, t = _inputs(config, seed=0)
  forward(params, x, t, jnp.array([0, 1]))
  x, t = _inputs(config, seed=1)
  forward(params, x, t, jnp.array([2, 3]))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bfloat16_compute_close_to_float32(arch):
  config = _config(**ARCHS[arch])
  model32 = _random_model(config)
  config.model.compute_dtype = "bfloat16"
  graphdef16, params16 = nnx.split(nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0))))
  for leaf in jax.tree.leaves(params16):
    chex.assert_type(leaf, jnp.float32)  # params stay float32 under bf16 compute
  model16 = nnx.merge(graphdef16, nnx.state(model32))
  x, t = _inputs(config)
  out32, out16 = _apply(model32, x, t), _apply(model16, x, t)
  chex.assert_type(out16, jnp.float32)
  # bfloat16 keeps 8 mantissa bits (relative rounding 2**-9 ~ 0.2%); through ~20 layers the
  # error compounds, so we allow 5% of the output's scale.
  scale = float(jnp.abs(out32).max())
  assert scale > 1e-2
  assert float(jnp.abs(out16 - out32).max()) <= 0.05 * scale


BAD_CONFIGS = {
  "image_size_not_divisible": (
    {"data__image_size": 28, "model__ch_mult": (1, 2, 2, 2), "model__attn_resolutions": ()},
    r"image_size=28 is not divisible by .*=8",
  ),
  "groups_do_not_divide": ({"model__num_groups": 5}, r"num_groups=5 does not divide"),
  "attn_resolution_not_reached": ({"model__attn_resolutions": (16,)}, r"\[16\] are never reached"),
  "unknown_name": ({"model__name": "vit"}, r"model.name='vit' is not supported"),
  "unknown_resblock": ({"model__resblock": "resnext"}, r"model.resblock='resnext'.*'biggan'"),
  "unknown_attention": ({"model__attention": "flash"}, r"model.attention='flash'.*'linear'"),
  "unknown_dtype": ({"model__compute_dtype": "float16"}, r"compute_dtype='float16'.*bfloat16"),
  "unknown_var_type": ({"diffusion__var_type": "learnt"}, r"var_type='learnt'.*learned_range"),
  "heads_do_not_divide": ({"model__num_heads": 3}, r"not divisible by model.num_heads=3"),
  "head_channels_do_not_divide": (
    {"model__num_head_channels": 24},
    r"not divisible by model.num_head_channels=24",
  ),
  "dit_patch_does_not_divide": (
    {"model__name": "dit", "model__patch_size": 3},
    r"image_size=8 is not divisible by model.patch_size=3",
  ),
  "dit_heads_do_not_divide": (
    {"model__name": "dit", "model__num_heads": 5},
    r"DiT: width 32 is not divisible by model.num_heads=5",
  ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_raises_informative_error(case):
  overrides, message = BAD_CONFIGS[case]
  with pytest.raises(ValueError, match=message):
    # Abstract build: the checks must fire before any parameter is allocated.
    nnx.eval_shape(lambda: build_model(_config(**overrides), rngs=nnx.Rngs(0)))


def _abstract_param_count(config):
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  assert all(isinstance(p, jax.ShapeDtypeStruct) for p in jax.tree.leaves(params))
  return count_params(params)


def test_cifar10_unet_has_ddpm_parameter_count():
  # Ho et al. 2020 report 35.7M; the official TF model (diffusion_tf) has 35,746,307.
  assert _abstract_param_count(cifar10.get_config()) == 35_746_307


def test_dit_xl2_has_reference_parameter_count():
  # facebookresearch/DiT prints 675,129,632 for DiT-XL/2 at 256px (32x32x4 latents, 1000
  # classes, learned sigma); that includes its frozen 256x1152 position table (294,912), which
  # here is computed on the fly instead of being stored.
  config = _config(
    data__image_size=32,
    data__channels=4,
    data__num_classes=1000,
    model__class_conditional=True,
    diffusion__var_type="learned_range",
  )
  config.model.update(dit_preset("dit_xl2"))
  assert _abstract_param_count(config) == 675_129_632 - 256 * 1152


def test_param_table_sums_to_count():
  model = _random_model(_config())
  params = nnx.state(model, nnx.Param)
  table = param_table(params)
  assert sum(n for _, n in table) == count_params(params) == count_params(model)
  assert dict(table)["conv_in"] == 3 * 3 * 1 * 32 + 32
  top = dict(param_table(params, depth=1))
  assert set(top) >= {"conv_in", "down", "mid_attn", "up", "conv_out"}
  assert sum(top.values()) == count_params(params)


def test_dit_presets():
  config = tiny.get_config()
  config.model.update(dit_preset("dit_s2"))  # every override is an existing key
  assert (config.model.hidden_size, config.model.depth, config.model.num_heads) == (384, 12, 6)
  with pytest.raises(ValueError, match="Unknown DiT preset 'dit_m2'"):
    dit_preset("dit_m2")


def test_timestep_embedding_matches_ddpm_reference():
  t = np.array([0, 1, 17, 999])
  dim = 9  # odd: the last column is zero padding
  half = dim // 2
  freqs = np.exp(-math.log(10_000) * np.arange(half, dtype=np.float64) / (half - 1))
  args = t[:, None].astype(np.float64) * freqs[None]
  expected = np.concatenate([np.sin(args), np.cos(args), np.zeros((4, 1))], axis=1)
  # float32 arguments of up to ~1000 radians carry ~1e-4 absolute rounding.
  np.testing.assert_allclose(layers.timestep_embedding(jnp.asarray(t), dim), expected, atol=2e-4)


def test_sincos_2d_pos_embed_matches_dit_reference():
  def embed_1d(d, pos):
    omega = 1.0 / 10_000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  dim, gh, gw = 16, 3, 5
  grid = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
  expected = np.concatenate([embed_1d(dim // 2, grid[0]), embed_1d(dim // 2, grid[1])], axis=1)
  np.testing.assert_allclose(layers.sincos_2d_pos_embed(dim, gh, gw), expected, atol=1e-6)


def test_attention_matches_numpy_reference():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 6, 3, 4)) for _ in range(3))  # [B, N, heads, d]

  def softmax(a, axis):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)

  w = softmax(np.einsum("bnhd,bmhd->bhnm", q, k) / 2.0, axis=-1)
  expected = np.einsum("bhnm,bmhe->bnhe", w, v)
  got = layers.dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  np.testing.assert_allclose(got, expected, atol=1e-5)

  # Linear attention: q softmaxed over features, k over positions, out = q (k^T v).
  ql, kl = softmax(q, axis=-1) / 2.0, softmax(k, axis=1)
  expected = np.einsum("bnhd,bhde->bnhe", ql, np.einsum("bnhd,bnhe->bhde", kl, v))
  got = layers.linear_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  np.testing.assert_allclose(got, expected, atol=1e-5)

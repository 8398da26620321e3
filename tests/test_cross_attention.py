"""Tests for text conditioning (jaxdiff.models.cross_attention and its use in UNet and DiT).

As in test_models.py, the run time is tracing and compiling: models are built abstractly once
and filled with NumPy random parameters (nothing zero, so the zero-initialised output layers do
not hide the inputs), and each model's forward pass is one jit shared through module fixtures.
"""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.models import count_params
from jaxdiff.models.cross_attention import CrossAttention, SpatialCrossAttention, split_conditioning
from jaxdiff.models.dit import DiT
from jaxdiff.models.unet import UNet

B, L, DC, NUM_CLASSES = 2, 5, 12, 3
# A one-level U-Net: self-attention (so cross-attention) on the down path, in the middle and on
# the up path, all at 8x8.
UNET = dict(in_channels=3, out_channels=3, image_size=8, ch=16, ch_mult=(1,), num_res_blocks=1)
UNET.update(attn_resolutions=(8,), num_groups=4, num_heads=2)
DIT = dict(in_channels=3, out_channels=3, image_size=8, patch_size=2, hidden_size=32, depth=2)
DIT.update(num_heads=2)
ARCHS = {"unet": (UNet, UNET), "dit": (DiT, DIT)}
# Parameter counts of these two configs before text conditioning existed (no classes).
COUNTS_WITHOUT_TEXT = {"unet": 45_091, "dit": 50_028}
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Row 0 has two padding tokens, row 1 none.
MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)


def _name(path) -> str:
  return ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _randomize(state, seed=0):
  """Non-zero NumPy random values for an (abstract) state, scaled like a sensible init."""
  rng = np.random.default_rng(seed)

  def init(path, p):
    leaf, noise = _name(path).split(".")[-1], rng.standard_normal(p.shape)
    if leaf == "scale":
      value = 1.0 + 0.1 * noise
    elif leaf == "kernel":
      value = noise / math.sqrt(math.prod(p.shape[:-1]))
    else:
      value = 0.1 * noise
    return jnp.asarray(value, p.dtype)

  return jax.tree_util.tree_map_with_path(init, state)


def _zero_cross_out(params):
  """``params`` with every cross-attention output projection zero, as initialised."""

  def zero(path, p):
    name = _name(path)
    return jnp.zeros_like(p) if "cross_attn" in name and ".proj_out." in name else p

  return jax.tree_util.tree_map_with_path(zero, params)


def _flat_shapes(state) -> dict[str, tuple[int, ...]]:
  return {_name(path): p.shape for path, p in jax.tree_util.tree_flatten_with_path(state)[0]}


def _text(seed=0, mask=MASK):
  rng = np.random.default_rng(seed)
  tokens = rng.standard_normal((B, L, DC)).astype(np.float32)
  tokens = np.where(mask[..., None], tokens, 0.0)  # as jaxdiff.text.encode returns them
  pooled = rng.standard_normal((B, DC)).astype(np.float32)
  return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask), "pooled": jnp.asarray(pooled)}


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((B, 8, 8, 3)), jnp.float32)
  return x, jnp.asarray(rng.integers(0, 1000, (B,)), jnp.int32)


@dataclasses.dataclass
class Model:
  """An abstractly built model with random parameters and its jitted forward pass."""

  graphdef: nnx.GraphDef
  params: nnx.State
  forward: jax.stages.Wrapped  # (params, x, t, y) -> output


def _abstract(arch, **kw):
  cls, base = ARCHS[arch]

  def build():
    # Draws counted in NumPy: a traced counter makes an abstract build quadratic in its size
    # (see jaxdiff.models._abstract_model).
    rngs = nnx.Rngs(0)
    rngs.default.count = nnx.RngCount(np.zeros((), np.uint32), tag="default")
    return cls(**base, **kw, rngs=rngs)

  return nnx.split(nnx.eval_shape(build))


def _model(arch, **kw) -> Model:
  graphdef, state = _abstract(arch, **kw)

  def forward(params, x, t, y):
    return nnx.merge(graphdef, params)(x, t, y)

  return Model(graphdef, _randomize(state), jax.jit(forward, compiler_options=FAST_COMPILE))


@pytest.fixture(scope="module", params=list(ARCHS))
def text_model(request):
  """(arch, a class- and text-conditional model): every call below shares its one compile."""
  return request.param, _model(request.param, num_classes=NUM_CLASSES, context_dim=DC)


def _y(labels=(0, 2), **text):
  return {"label": jnp.asarray(labels, jnp.int32), **(text or _text())}


def _max_abs(a, b) -> float:
  return float(jnp.abs(a - b).max())


# --- The layer against a float64 NumPy reference ---------------------------------------------


def _layer_norm(x, scale, bias, eps=1e-6):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _group_norm(x, scale, bias, groups, eps=1e-6):  # x [B, N, C]
  g = x.reshape(*x.shape[:2], groups, -1)
  mean, var = g.mean((1, 3), keepdims=True), g.var((1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _reference(p, x, context, mask, num_heads, norm):
  """``x + proj_out(attention(norm(x), real tokens))`` per example, from the real tokens only."""
  b, n, c = x.shape
  dh = c // num_heads
  q = norm(x) @ p["q.kernel"] + p["q.bias"]
  out = np.zeros_like(x)
  for i in range(b):
    real = context[i][mask[i]]  # [L_i, Dc]: padding never enters
    if not len(real):
      continue  # no text: no update
    k, v = real @ p["k.kernel"] + p["k.bias"], real @ p["v.kernel"] + p["v.bias"]
    for h in range(num_heads):
      s = slice(h * dh, (h + 1) * dh)
      logits = q[i][:, s] @ k[:, s].T / math.sqrt(dh)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      out[i][:, s] = (w / w.sum(-1, keepdims=True)) @ v[:, s]
  return x + out @ p["proj_out.kernel"]


@pytest.mark.parametrize("spatial", [False, True], ids=["tokens_layernorm", "nhwc_groupnorm"])
def test_cross_attention_matches_numpy_reference(spatial):
  heads, groups, c = 2, 4, 16
  if spatial:
    make = lambda: SpatialCrossAttention(
      c, DC, num_heads=heads, num_groups=groups, rngs=nnx.Rngs(0)
    )
    shape = (3, 2, 3, c)
  else:
    make = lambda: CrossAttention(c, DC, num_heads=heads, rngs=nnx.Rngs(0))
    shape = (3, 6, c)
  graphdef, state = nnx.split(nnx.eval_shape(make))
  state = _randomize(state)
  rng = np.random.default_rng(1)
  x = rng.standard_normal(shape)
  context = rng.standard_normal((3, L, DC))
  # Row 0 ends in padding, row 1 is all text, row 2 all padding (an empty context).
  mask = np.array([[1, 1, 1, 0, 0], [1] * L, [0] * L], bool)
  context[0, 3], context[0, 4], context[2, 1] = np.inf, np.nan, -np.inf  # padding: never read
  apply = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a), compiler_options=FAST_COMPILE)
  got = apply(state, *(jnp.asarray(a, jnp.float32) for a in (x, context)), jnp.asarray(mask))

  p = {
    ".".join(map(str, path)): np.asarray(v[...], np.float64) for path, v in nnx.to_flat_state(state)
  }
  if spatial:
    norm = lambda h: _group_norm(h, p["norm.scale"], p["norm.bias"], groups)
  else:
    norm = lambda h: _layer_norm(h, p["norm.scale"], p["norm.bias"])
  flat = x.reshape(3, -1, c)
  expected = _reference(p, flat, context, mask, heads, norm).reshape(shape)
  # float32 arithmetic (highest matmul precision) on O(1) values: ~1e-6 rounding.
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  # An all-padding row is exactly the residual: no NaN, no attention-weighted average of junk.
  chex.assert_trees_all_equal(got[2], jnp.asarray(x[2], jnp.float32))


def test_real_init_is_the_identity():
  # The real (eager) init; an rbg key only because it compiles faster than threefry.
  layer = CrossAttention(16, DC, num_heads=2, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  assert not jnp.any(layer.proj_out.kernel[...]) and layer.proj_out.bias is None
  assert jnp.any(layer.q.kernel[...]) and jnp.any(layer.k.kernel[...])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, 6, 16)), jnp.float32)
  text = _text()
  graphdef, state = nnx.split(layer)
  apply = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a), compiler_options=FAST_COMPILE)
  chex.assert_trees_all_equal(apply(state, x, text["tokens"], text["mask"]), x)


# --- Whole models: padding, empty text, identity at init, tokens, pooled, labels -------------


def test_padding_tokens_change_nothing(text_model):
  _, m = text_model
  x, t = _inputs()
  text = _text()
  junk = 1e4 * np.random.default_rng(5).standard_normal((B, L, DC))
  tokens = jnp.where(MASK[..., None], text["tokens"], jnp.asarray(junk, jnp.float32))
  out = m.forward(m.params, x, t, _y(**text))
  out_junk = m.forward(m.params, x, t, _y(**{**text, "tokens": tokens}))
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_equal(out_junk, out)


def test_empty_text_is_no_cross_attention(text_model):
  """An all-padding caption gives what the model gives with its cross-attention switched off
  (zero output projections, i.e. as initialised); and that model ignores the tokens."""
  _, m = text_model
  x, t = _inputs()
  text, other = _text(0), _text(1)
  empty = {**text, "mask": jnp.zeros((B, L), bool)}
  off = _zero_cross_out(m.params)
  out_empty = m.forward(m.params, x, t, _y(**empty))
  out_off = m.forward(off, x, t, _y(**text))
  chex.assert_tree_all_finite(out_empty)
  chex.assert_trees_all_close(out_empty, out_off, atol=1e-6, rtol=0)
  # Identity at init: with zero output projections the tokens (not the pooled) are ignored...
  chex.assert_trees_all_equal(
    m.forward(off, x, t, _y(**{**other, "pooled": text["pooled"]})), out_off
  )
  # ...and once the projections are perturbed, the tokens matter.
  out = m.forward(m.params, x, t, _y(**text))
  out_other = m.forward(m.params, x, t, _y(**{**other, "pooled": text["pooled"]}))
  assert _max_abs(out_other, out) > 1e-3


def test_shapes_and_what_changes_the_output(text_model):
  _, m = text_model
  x, t = _inputs()
  text = _text()
  out = m.forward(m.params, x, t, _y(**text))
  chex.assert_shape(out, (B, 8, 8, 3))
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  other_pooled = {**text, "pooled": _text(1)["pooled"]}
  assert _max_abs(m.forward(m.params, x, t, _y(**other_pooled)), out) > 1e-3
  assert _max_abs(m.forward(m.params, x, t, _y((1, 0), **text)), out) > 1e-3  # labels still count


@pytest.mark.parametrize("arch", list(ARCHS))
def test_text_only_model(arch):
  m = _model(arch, context_dim=DC)
  x, t = _inputs()
  out = m.forward(m.params, x, t, _text())
  chex.assert_shape(out, (B, 8, 8, 3))
  chex.assert_tree_all_finite(out)
  with pytest.raises(ValueError, match="unconditional model"):
    m.forward(m.params, x, t, _y())


# --- Parameters -------------------------------------------------------------------------------


def _cross_attention_params(c: int) -> int:
  # norm scale+bias, q (c -> c), k and v (Dc -> c) with biases, proj_out (c -> c) without.
  return 2 * c + (c * c + c) + 2 * (DC * c + c) + c * c


@pytest.mark.parametrize("arch", list(ARCHS))
def test_parameter_tree_without_text_is_unchanged_and_text_only_adds(arch):
  base = _flat_shapes(_abstract(arch)[1])
  assert _flat_shapes(_abstract(arch, context_dim=0)[1]) == base
  assert count_params(_abstract(arch)[1]) == COUNTS_WITHOUT_TEXT[arch]
  assert not [k for k in base if "cross" in k or "pooled" in k]

  text = _flat_shapes(_abstract(arch, context_dim=DC)[1])
  # Every existing parameter keeps its path and shape; the new ones are cross-attention layers
  # and the pooled-embedding projection (into the timestep embedding: 4ch, or hidden_size).
  assert {k: text[k] for k in base} == base
  new = {k: v for k, v in text.items() if k not in base}
  assert all(k.startswith("pooled_proj.") or "cross_attn" in k for k in new)
  if arch == "unet":
    # One after each self-attention: down, middle and two on the way up.
    emb, layers_, width = 4 * UNET["ch"], 4, UNET["ch"]
    assert {k.split(".proj_out")[0] for k in new if ".proj_out." in k} == {
      "down.0.cross_attns.0", "mid_cross_attn", "up.0.cross_attns.0", "up.0.cross_attns.1"
    }  # fmt: skip
  else:
    emb, layers_, width = DIT["hidden_size"], DIT["depth"], DIT["hidden_size"]
  expected = layers_ * _cross_attention_params(width) + DC * emb + emb
  assert sum(math.prod(v) for v in new.values()) == expected


# --- Errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "y, message",
  [
    ({"tokens": 0, "mask": 0, "pooled": 0, "caption": 0}, r"unknown keys \['caption'\].*'label'"),
    ({"tokens": np.zeros((B, L, DC), np.float32)}, r"not \['mask', 'pooled'\]"),
    ({**_text(), "mask": None}, r"has \['tokens', 'pooled'\] but not \['mask'\]"),
    ({**_text(), "tokens": np.zeros((B, DC), np.float32)}, r"y\['tokens'\] must be \[B, L, Dc\]"),
    ({**_text(), "tokens": np.zeros((B, L, DC), np.int32)}, r"y\['tokens'\] must be.*floats"),
    ({**_text(), "mask": np.ones((B, L + 1), bool)}, r"y\['mask'\] must be \[B, L\]=\(2, 5\)"),
    ({**_text(), "mask": np.ones((B, L), np.float32)}, r"y\['mask'\] must be .* bools"),
    ({**_text(), "pooled": np.zeros((B, DC + 1))}, r"y\['pooled'\] must be \[B, Dc\]=\(2, 12\)"),
    ({**_text(), "label": np.zeros((B + 1,), np.int32)}, r"y\['label'\] has shape \(3,\)"),
    ({**_text(), "label": np.zeros((B,), np.float32)}, r"y\['label'\] must be \[B\] int"),
  ],
  ids=[
    "unknown_key", "tokens_alone", "no_mask", "tokens_2d", "int_tokens", "mask_length",
    "float_mask", "pooled_width", "label_batch", "float_label",
  ],
)  # fmt: skip
def test_malformed_conditioning_raises(y, message):
  with pytest.raises(ValueError, match=message):
    split_conditioning(y)


def test_split_conditioning_passes_labels_through():
  labels = jnp.array([1, 2])
  assert split_conditioning(labels) == (labels, None, None, None)
  assert split_conditioning(None) == (None, None, None, None)
  got_labels, tokens, mask, pooled = split_conditioning({**_text(), "label": labels})
  assert got_labels is not None and tokens.shape == (B, L, DC) and pooled.shape == (B, DC)
  int_mask = split_conditioning({**_text(), "mask": MASK.astype(np.int32)})[2]
  chex.assert_trees_all_equal(int_mask, jnp.asarray(MASK))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_text_given_to_the_wrong_model_raises(arch):
  x, t = _inputs()
  # Tracing is enough: the checks run on shapes, before anything compiles.
  with_text = _model(arch, num_classes=NUM_CLASSES, context_dim=DC)
  for y in (None, jnp.array([0, 1]), {"label": jnp.array([0, 1])}):
    with pytest.raises(ValueError, match="attends to text .context_dim=12. but y has no text"):
      jax.eval_shape(with_text.forward, with_text.params, x, t, y)
  wide = {**_text(), "tokens": jnp.zeros((B, L, DC + 4)), "pooled": jnp.zeros((B, DC + 4))}
  with pytest.raises(ValueError, match=r"Dc=context_dim=12"):
    jax.eval_shape(with_text.forward, with_text.params, x, t, wide)
  one = {k: v[:1] for k, v in _text().items()}
  with pytest.raises(ValueError, match=r"B=2 \(the batch of x\)"):
    jax.eval_shape(with_text.forward, with_text.params, x, t, one)
  without = _model(arch, num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match=r"no cross-attention \(context_dim=0\)"):
    jax.eval_shape(without.forward, without.params, x, t, _y())


# --- Gradients, tracing, remat and bfloat16 -----------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradients_finite_and_nonzero_with_remat(arch):
  m = _model(arch, context_dim=DC, remat=True)
  x, t = _inputs()
  junk = jnp.asarray(1e4 * np.random.default_rng(2).standard_normal((B, L, DC)), jnp.float32)
  text = _text()
  text["tokens"] = jnp.where(MASK[..., None], text["tokens"], junk)  # large junk at padding

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def loss_and_grad(params, tokens):
    def loss(p, tokens):
      return jnp.mean(nnx.merge(m.graphdef, p)(x, t, {**text, "tokens": tokens}) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1))(params, tokens)

  loss, (grads, token_grads) = loss_and_grad(m.params, text["tokens"])
  chex.assert_tree_all_finite((loss, grads, token_grads))
  # Remat changes only the backward pass: the loss is the plain forward's.
  np.testing.assert_allclose(loss, jnp.mean(m.forward(m.params, x, t, text) ** 2), rtol=1e-5)
  flat = {_name(path): g for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  new = [k for k in flat if "cross_attn" in k or k.startswith("pooled_proj.")]
  assert new and all(float(jnp.abs(flat[k]).max()) > 0 for k in new), new
  # The text's gradient reaches every real token and no padding one.
  per_token = jnp.abs(token_grads).max(-1)  # [B, L]
  assert bool(jnp.all((per_token > 0) == MASK)), per_token


def test_jitted_forward_with_text_traces_once():
  m = _model("dit", context_dim=DC)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  @chex.assert_max_traces(n=1)
  def forward(params, x, t, y):
    return nnx.merge(m.graphdef, params)(x, t, y)

  x, t = _inputs(0)
  out0 = forward(m.params, x, t, _text(0))
  x, t = _inputs(1)
  out1 = forward(m.params, x, t, _text(1, mask=np.ones((B, L), bool)))
  assert _max_abs(out0, out1) > 1e-3


@pytest.mark.slow  # compiles each backbone twice more; dtypes are covered in test_models
@pytest.mark.parametrize("arch", list(ARCHS))
def test_bfloat16_compute_close_to_float32(arch):
  m32 = _model(arch, context_dim=DC)
  m16 = _model(arch, context_dim=DC, dtype=jnp.bfloat16)
  for leaf in jax.tree.leaves(m16.params):
    chex.assert_type(leaf, jnp.float32)  # parameters stay float32 under bf16 compute
  x, t = _inputs()
  text = _text()
  out32, out16 = m32.forward(m32.params, x, t, text), m16.forward(m32.params, x, t, text)
  chex.assert_type(out16, jnp.float32)
  # As in test_models: bfloat16's 2**-9 relative rounding compounds over ~20 layers; 5% of scale.
  scale = float(jnp.abs(out32).max())
  assert scale > 1e-2 and _max_abs(out16, out32) <= 0.05 * scale

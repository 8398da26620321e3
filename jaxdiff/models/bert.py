"""BERT encoder (Devlin et al. 2019) in Flax NNX, for frozen pretrained text encoders.

The architecture of Hugging Face's ``BertModel`` without the pooler: word + position +
token-type embeddings, LayerNorm, then post-LN encoder layers (self-attention -> add & norm ->
exact-erf GELU MLP -> add & norm). Attribute names differ from PyTorch's; :func:`torch_params`
is the one table between the two, and :func:`load_state_dict` fills a model from a PyTorch /
safetensors state dict through it.

Inference only: no dropout, and every parameter and every operation is float32 with HIGHEST
matmul precision (no TF32 / bfloat16 passes on accelerators); on CPU the outputs match the
PyTorch model to a few 1e-6 (benchmarks/check_text_encoder.py). No file is read here
(``jaxdiff.text`` finds and reads the weights).

Example::

  model = Bert(**MINILM_L6, rngs=nnx.Rngs(0))   # random; load_state_dict(model, sd) for weights
  hidden = model(input_ids, mask)                # [B, L] int32, [B, L] bool -> [B, L, 384]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST
# BERT's initialisation (initializer_range=0.02); only random models (tests) use it.
_normal_init = nnx.initializers.normal(0.02)

# sentence-transformers/all-MiniLM-L6-v2 (config.json of the checkpoint).
MINILM_L6 = dict(
  vocab_size=30522,
  hidden_size=384,
  num_layers=6,
  num_heads=12,
  intermediate_size=1536,
  max_positions=512,
)

# Entries of a Hugging Face state dict that the encoder does not use: the pooler (a tanh layer
# on [CLS] for next-sentence prediction) and the position-ids buffer (always arange(512)).
_UNUSED_PREFIXES = ("pooler.",)
_UNUSED_KEYS = ("embeddings.position_ids",)
# Checkpoints saved from BertForPreTraining & co. nest the encoder under "bert.".
_OPTIONAL_PREFIX = "bert."


def _linear(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, kernel_init=_normal_init, precision=_HIGHEST, rngs=rngs)


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # E[(x - mean)^2], not E[x^2] - mean^2: the fast form cancels catastrophically when the
  # mean is large next to the spread, and PyTorch uses the two-pass form.
  return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


def _embed(num: int, dim: int, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(num, dim, embedding_init=_normal_init, rngs=rngs)


class BertEmbeddings(nnx.Module):
  """Word + absolute position + token-type embeddings, then LayerNorm."""

  def __init__(
    self,
    vocab_size: int,
    hidden_size: int,
    max_positions: int,
    type_vocab_size: int,
    layer_norm_eps: float,
    *,
    rngs: nnx.Rngs,
  ):
    self.word = _embed(vocab_size, hidden_size, rngs)
    self.position = _embed(max_positions, hidden_size, rngs)
    self.token_type = _embed(type_vocab_size, hidden_size, rngs)
    self.norm = _layer_norm(hidden_size, layer_norm_eps, rngs)

  def __call__(self, input_ids: Array, token_type_ids: Array) -> Array:
    positions = jnp.arange(input_ids.shape[1])  # [L]
    x = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
    return self.norm(x)  # [B, L, D]


class BertLayer(nnx.Module):
  """One post-LN encoder layer: ``x = LN(x + Attn(x)); x = LN(x + MLP(x))``."""

  def __init__(
    self,
    hidden_size: int,
    num_heads: int,
    intermediate_size: int,
    layer_norm_eps: float,
    *,
    rngs: nnx.Rngs,
  ):
    self.num_heads = num_heads
    self.query = _linear(hidden_size, hidden_size, rngs)
    self.key = _linear(hidden_size, hidden_size, rngs)
    self.value = _linear(hidden_size, hidden_size, rngs)
    self.attn_out = _linear(hidden_size, hidden_size, rngs)
    self.attn_norm = _layer_norm(hidden_size, layer_norm_eps, rngs)
    self.mlp_in = _linear(hidden_size, intermediate_size, rngs)
    self.mlp_out = _linear(intermediate_size, hidden_size, rngs)
    self.mlp_norm = _layer_norm(hidden_size, layer_norm_eps, rngs)

  def __call__(self, x: Array, attn_bias: Array) -> Array:
    """``x`` is ``[B, L, D]``; ``attn_bias`` ``[B, 1, 1, L]`` is added to the attention logits."""
    b, n, d = x.shape

    def heads(p: nnx.Linear) -> Array:
      return p(x).reshape(b, n, self.num_heads, d // self.num_heads)  # [B, L, heads, d_h]

    q, k, v = heads(self.query), heads(self.key), heads(self.value)
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, precision=_HIGHEST) * (q.shape[-1] ** -0.5)
    weights = jax.nn.softmax(logits + attn_bias, axis=-1)  # [B, heads, L, L]
    attn = jnp.einsum("bhnm,bmhd->bnhd", weights, v, precision=_HIGHEST).reshape(b, n, d)
    x = self.attn_norm(x + self.attn_out(attn))
    # BERT's "gelu" is the exact erf form, not the tanh approximation jax defaults to.
    h = jax.nn.gelu(self.mlp_in(x), approximate=False)  # [B, L, intermediate]
    return self.mlp_norm(x + self.mlp_out(h))


class Bert(nnx.Module):
  """A BERT encoder returning the last hidden states (no pooler).

  Parameters are float32 and start random (N(0, 0.02) weights, as BERT initialises them);
  :func:`load_state_dict` replaces them with pretrained ones.
  """

  def __init__(
    self,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int,
    *,
    type_vocab_size: int = 2,
    layer_norm_eps: float = 1e-12,
    rngs: nnx.Rngs,
  ):
    if hidden_size % num_heads:
      raise ValueError(f"BERT hidden_size={hidden_size} is not divisible by num_heads={num_heads}.")
    self.max_positions = max_positions
    self.embeddings = BertEmbeddings(
      vocab_size, hidden_size, max_positions, type_vocab_size, layer_norm_eps, rngs=rngs
    )
    self.layers = nnx.List(
      [
        BertLayer(hidden_size, num_heads, intermediate_size, layer_norm_eps, rngs=rngs)
        for _ in range(num_layers)
      ]
    )

  def __call__(self, input_ids: Array, mask: Array, token_type_ids: Array | None = None) -> Array:
    """The last hidden states.

    Args:
      input_ids: ``[B, L]`` int token ids, ``L <= max_positions``.
      mask: ``[B, L]`` bool or 0/1 ints; 1 marks a real token, 0 padding. Padding is never
        attended to, but its own hidden states are computed (and meaningless).
      token_type_ids: ``[B, L]`` segment ids; None means all zeros (a single sentence).

    Returns:
      ``[B, L, hidden_size]`` float32.
    """
    if input_ids.shape[1] > self.max_positions:
      raise ValueError(
        f"BERT input of length {input_ids.shape[1]} exceeds max_positions={self.max_positions}."
      )
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids)
    # Hugging Face's additive mask: the most negative float32 at padded keys. A row with no
    # real key would then attend uniformly, not produce NaN (exp(-inf - -inf)).
    keep = jnp.asarray(mask).astype(bool)[:, None, None, :]  # [B, 1, 1, L]
    attn_bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)
    for layer in self.layers:
      x = layer(x, attn_bias)
    return x


def torch_params(model: Bert) -> dict[str, tuple[nnx.Variable, bool]]:
  """Every Hugging Face ``BertModel`` state-dict key the encoder uses, mapped to
  ``(parameter, transposed)``; ``transposed`` marks torch Linear weights, stored ``[out, in]``.

  Works on a model from ``nnx.eval_shape`` too (shapes only).
  """
  e = model.embeddings
  table: dict[str, tuple[nnx.Variable, bool]] = {
    "embeddings.word_embeddings.weight": (e.word.embedding, False),
    "embeddings.position_embeddings.weight": (e.position.embedding, False),
    "embeddings.token_type_embeddings.weight": (e.token_type.embedding, False),
    "embeddings.LayerNorm.weight": (e.norm.scale, False),
    "embeddings.LayerNorm.bias": (e.norm.bias, False),
  }
  for i, layer in enumerate(model.layers):
    prefix = f"encoder.layer.{i}."
    linears = {
      "attention.self.query": layer.query,
      "attention.self.key": layer.key,
      "attention.self.value": layer.value,
      "attention.output.dense": layer.attn_out,
      "intermediate.dense": layer.mlp_in,
      "output.dense": layer.mlp_out,
    }
    for name, lin in linears.items():
      table[f"{prefix}{name}.weight"] = (lin.kernel, True)
      table[f"{prefix}{name}.bias"] = (lin.bias, False)
    norms = {"attention.output.LayerNorm": layer.attn_norm, "output.LayerNorm": layer.mlp_norm}
    for name, norm in norms.items():
      table[f"{prefix}{name}.weight"] = (norm.scale, False)
      table[f"{prefix}{name}.bias"] = (norm.bias, False)
  return table


def _strip(key: str) -> str:
  return key[len(_OPTIONAL_PREFIX) :] if key.startswith(_OPTIONAL_PREFIX) else key


def _is_unused(key: str) -> bool:
  return key in _UNUSED_KEYS or key.startswith(_UNUSED_PREFIXES)


def _torch_shape(var: nnx.Variable, transposed: bool) -> tuple[int, ...]:
  shape = tuple(var.shape)
  return shape[::-1] if transposed else shape


def _listed(kind: str, keys: list[str], limit: int = 5) -> str:
  shown = ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
  return f"{kind}: {shown}"


def check_state_dict(model: Bert, state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The entries of ``state_dict`` that :func:`load_state_dict` uses, keyed as in
  :func:`torch_params` (a leading ``bert.`` stripped; the pooler and ``position_ids`` dropped).

  Raises:
    ValueError: naming every missing and unexpected key and every shape mismatch, at once.
  """
  table = torch_params(model)
  given = {_strip(k): v for k, v in state_dict.items() if not _is_unused(_strip(k))}
  problems = []
  if missing := [k for k in table if k not in given]:
    problems.append(_listed("missing keys", missing))
  if unexpected := sorted(k for k in given if k not in table):
    problems.append(_listed("unexpected keys", unexpected))
  for key, (var, transposed) in table.items():
    expected = _torch_shape(var, transposed)
    if key in given and tuple(np.shape(given[key])) != expected:
      got = tuple(np.shape(given[key]))
      problems.append(f"{key} has shape {got}, expected {expected} (PyTorch layout)")
  if problems:
    raise ValueError("BERT weights do not fit the model: " + "; ".join(problems))
  return given


def load_state_dict(model: Bert, state_dict: Mapping[str, Any]) -> Bert:
  """Sets ``model``'s parameters from a Hugging Face ``BertModel`` state dict, in place.

  Args:
    model: a :class:`Bert` of the checkpoint's sizes (may come from ``nnx.eval_shape``).
    state_dict: name -> array in PyTorch layout, e.g. ``safetensors.numpy.load_file(path)``;
      keys may carry a ``bert.`` prefix; ``pooler.*`` and ``embeddings.position_ids`` are
      ignored.

  Returns:
    ``model``, for chaining.

  Raises:
    ValueError: see :func:`check_state_dict`.
  """
  given = check_state_dict(model, state_dict)
  for key, (var, transposed) in torch_params(model).items():
    value = np.asarray(given[key], dtype=np.float32)
    var.set_value(jnp.asarray(value.T if transposed else value))
  return model

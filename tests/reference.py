"""Independent float64 NumPy references for the diffusion maths.

Written from the papers, not from jaxdiff: where a closed form exists in more
than one shape, this file uses the other one (loops instead of cumprod, the
posterior as a product of Gaussians instead of the coefficient form, KL in
terms of standard deviations, bin probabilities with math.erf).
"""

from __future__ import annotations

import math

import numpy as np

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------- schedules


def betas(name: str, T: int, **kw) -> np.ndarray:
  out = np.empty(T, dtype=np.float64)
  if name == "linear":
    lo = kw.get("beta_start", 1e-4 * 1000 / T)
    hi = kw.get("beta_end", 0.02 * 1000 / T)
    for i in range(T):
      out[i] = lo + (hi - lo) * (i / (T - 1) if T > 1 else 0.0)
  elif name == "cosine":
    s = kw.get("s", 0.008)

    def f(u):
      return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    for i in range(T):
      out[i] = min(1 - f((i + 1) / T) / f(i / T), kw.get("max_beta", 0.999))
  elif name == "quadratic":
    lo, hi = math.sqrt(kw.get("beta_start", 1e-4)), math.sqrt(kw.get("beta_end", 0.02))
    for i in range(T):
      out[i] = (lo + (hi - lo) * (i / (T - 1) if T > 1 else 0.0)) ** 2
  elif name == "sigmoid":
    lo, hi = kw.get("beta_start", 1e-4), kw.get("beta_end", 0.02)
    for i in range(T):
      z = -6 + 12 * (i / (T - 1) if T > 1 else 0.0)
      out[i] = lo + (hi - lo) / (1 + math.exp(-z))
  elif name == "geometric":
    lo, hi = kw.get("beta_start", 1e-4), kw.get("beta_end", 0.02)
    for i in range(T):
      out[i] = lo * (hi / lo) ** (i / (T - 1) if T > 1 else 0.0)
  elif name == "constant":
    out[:] = kw["beta"]
  else:
    raise KeyError(name)
  return out


def alpha_bar(b: np.ndarray) -> np.ndarray:
  out, acc = np.empty_like(b), 1.0
  for i, beta in enumerate(b):
    acc *= 1.0 - beta
    out[i] = acc
  return out


# ----------------------------------------------------------------------------- Gaussians


def q_mean_var(b, x0, t):
  ab = alpha_bar(b)[t]
  return math.sqrt(ab) * x0, 1.0 - ab


def posterior(b, x0, xt, t):
  """q(x_{t-1} | x_t, x_0) by multiplying q(x_t | x_{t-1}) and q(x_{t-1} | x_0)."""
  ab = alpha_bar(b)
  if t == 0:  # x_{-1} := x_0 exactly
    return x0.copy(), 0.0
  ab_prev, a_t = ab[t - 1], 1.0 - b[t]
  precision = 1.0 / (1.0 - ab_prev) + a_t / b[t]
  var = 1.0 / precision
  mean = var * (math.sqrt(ab_prev) * x0 / (1.0 - ab_prev) + math.sqrt(a_t) * xt / b[t])
  return mean, var


def posterior_var_clipped(b, t):
  return posterior(b, np.zeros(1), np.zeros(1), max(t, 1))[1]


def x0_from_eps(b, xt, t, eps):
  ab = alpha_bar(b)[t]
  return (xt - math.sqrt(1 - ab) * eps) / math.sqrt(ab)


def eps_from_x0(b, xt, t, x0):
  ab = alpha_bar(b)[t]
  return (xt - math.sqrt(ab) * x0) / math.sqrt(1 - ab)


def v_target(b, x0, t, eps):
  ab = alpha_bar(b)[t]
  return math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0


def x0_from_v(b, xt, t, v):
  # x_t = a x0 + s eps, v = a eps - s x0  =>  a x_t - s v = (a^2 + s^2) x0 = x0.
  ab = alpha_bar(b)[t]
  return math.sqrt(ab) * xt - math.sqrt(1 - ab) * v


def reverse_log_var(b, var_type, t, var_out=None):
  if var_type == "fixed_small":
    return math.log(posterior_var_clipped(b, t))
  if var_type == "fixed_large":
    return math.log(posterior_var_clipped(b, 1) if t == 0 else b[t])
  if var_type == "learned":
    return var_out
  frac = (var_out + 1) / 2
  return frac * math.log(b[t]) + (1 - frac) * math.log(posterior_var_clipped(b, t))


def p_mean_var(b, mean_type, var_type, out, xt, t, clip=True):
  """out: [..., C] or [..., 2C]; returns mean, log_var, pred_x0 (arrays)."""
  if var_type in ("learned", "learned_range"):
    c = out.shape[-1] // 2
    out, var_out = out[..., :c], out[..., c:]
  else:
    var_out = None
  if mean_type == "eps":
    x0 = x0_from_eps(b, xt, t, out)
  elif mean_type == "x0":
    x0 = out.copy()
  else:
    x0 = x0_from_v(b, xt, t, out)
  if clip:
    x0 = np.clip(x0, -1, 1)
  mean, _ = posterior(b, x0, xt, t)
  log_var = reverse_log_var(b, var_type, t, var_out) * np.ones_like(xt)
  return mean, log_var, x0


# ----------------------------------------------------------------------------- likelihoods


def normal_kl(m1, lv1, m2, lv2):
  s1, s2 = np.exp(0.5 * np.asarray(lv1)), np.exp(0.5 * np.asarray(lv2))
  return np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def _phi(z):
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0))) if math.isfinite(z) else float(z > 0)


def discretized_loglik(x, mean, log_scale):
  """Per element: integrate the Gaussian over x's bin (edge bins open-ended)."""
  x, mean, log_scale = np.broadcast_arrays(
    np.asarray(x, float), np.asarray(mean, float), np.asarray(log_scale, float)
  )
  out = np.empty(x.shape)
  for idx in np.ndindex(x.shape):
    k = round((x[idx] + 1) * 127.5)  # pixel value 0..255
    lo = -math.inf if k == 0 else (k - 0.5) / 127.5 - 1
    hi = math.inf if k == 255 else (k + 0.5) / 127.5 - 1
    s = math.exp(log_scale[idx])
    p = _phi((hi - mean[idx]) / s) - _phi((lo - mean[idx]) / s)
    out[idx] = math.log(max(p, 1e-12))
  return out


def vb_term_bpd(b, mean_type, var_type, out, x0, xt, t, clip=True):
  """One term of the bound for a single example (no batch axis) at integer t."""
  mean, log_var, _ = p_mean_var(b, mean_type, var_type, out, xt, t, clip)
  if t == 0:
    return -np.mean(discretized_loglik(x0, mean, 0.5 * log_var)) / LOG2
  tmean, tvar = posterior(b, x0, xt, t)
  return np.mean(normal_kl(tmean, math.log(tvar), mean, log_var)) / LOG2


def prior_bpd(b, x0):
  m, v = q_mean_var(b, x0, len(b) - 1)
  return np.mean(normal_kl(m, math.log(v), 0.0, 0.0)) / LOG2

"""Independent float64 NumPy references for the continuous-time maths (jaxdiff.core.continuous,
jaxdiff.core.zero_snr).

Written from the papers, not from jaxdiff, and where there is a choice in another shape: the
prediction conversions solve the 2x2 linear system, alpha and sigma come from the papers' own
closed forms (no expm1 or sine products), gamma'(t) by central differences, the VDM decoder as
normalised Gaussian densities of z_0, scalar loops for the grids and schedules.
"""

from __future__ import annotations

import math

import numpy as np

# ----------------------------------------------------------------------------- conversions


def x0_eps_from(kind, pred, x_t, alpha, sigma):
  """Solve ``[x_t, pred] = M [x0, eps]`` elementwise; M from the definition of ``kind``."""
  x0, eps = np.empty_like(x_t), np.empty_like(x_t)
  for idx in np.ndindex(x_t.shape):
    a, s = alpha[idx[0]], sigma[idx[0]]
    second = {"eps": (0.0, 1.0), "x0": (1.0, 0.0), "v": (-s, a), "score": (0.0, -1.0 / s)}[kind]
    m = np.array([[a, s], second])
    x0[idx], eps[idx] = np.linalg.solve(m, np.array([x_t[idx], pred[idx]]))
  return x0, eps


def prediction(kind, x0, eps, alpha, sigma):
  a = alpha.reshape(-1, *([1] * (x0.ndim - 1)))
  s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
  return {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -eps / s}[kind]


# ----------------------------------------------------------------------------- VP schedules


def vp_linear(t, beta_min=0.1, beta_max=20.0):
  """Song et al. 2021, App. B: the mean coefficient exp(-t^2 (b_max - b_min) / 4 - t b_min / 2)."""
  log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
  alpha = math.exp(log_alpha)
  var = 1.0 - alpha**2
  return alpha, math.sqrt(var), math.log(alpha**2 / var) if var > 0 else math.inf


def vp_cosine(t, s=0.008):
  """Nichol & Dhariwal eq. 17: alpha_bar = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) pi / 2)."""

  def f(u):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

  ab = min(max(f(t) / f(0), 0.0), 1.0) if t < 1 else 0.0
  return math.sqrt(ab), math.sqrt(1 - ab)


def derivative(fn, t, h=1e-5):
  """Central difference in float64."""
  return (fn(t + h) - fn(t - h)) / (2 * h)


# ----------------------------------------------------------------------------- VDM


def sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def vdm_prior_kl(x, gamma_1):
  """Per example: sum over pixels of KL(N(alpha_1 x, sigma_1^2) || N(0, 1))."""
  a, s = math.sqrt(sigmoid(-gamma_1)), math.sqrt(sigmoid(gamma_1))
  return np.sum(-math.log(s) + (s**2 + (a * x) ** 2) / 2 - 0.5)


def vdm_decoder_logprobs(z0, gamma_0, values):
  """log p(x = k | z_0) proportional to the density q(z_0 | x = x_k) = N(z_0; alpha_0 x_k,
  sigma_0^2), normalised over k with log-sum-exp. Per element, scalar maths."""
  a, s = math.sqrt(sigmoid(-gamma_0)), math.sqrt(sigmoid(gamma_0))
  out = np.empty(z0.shape + (len(values),))
  for idx in np.ndindex(z0.shape):
    logd = np.array([-0.5 * ((z0[idx] - a * v) / s) ** 2 for v in values])
    top = logd.max()
    out[idx] = logd - (top + math.log(sum(math.exp(d - top) for d in logd)))
  return out


def vdm_bound_terms(x, eps, t, gamma, eps_model, num_steps=0, eps_0=None):
  """The three terms of VDM's negative ELBO (Kingma et al. 2021, Sec. 4) in bits/dim, per
  example, from scalar float64 maths: gamma(t) a Python function, gamma'(t) by central
  differences, z_t = alpha_t x + sigma_t eps, eps_model(z_t, t) the prediction; the decoder's
  -log p(x | z_0) read off :func:`vdm_decoder_logprobs`."""
  B, D = x.shape[0], x[0].size
  values = np.arange(256) / 127.5 - 1
  eps_0 = eps if eps_0 is None else eps_0
  out = {"prior": [], "reconstruction": [], "diffusion": []}
  for b in range(B):
    out["prior"].append(vdm_prior_kl(x[b], gamma(1.0)))
    g0 = gamma(0.0)
    z0 = math.sqrt(sigmoid(-g0)) * x[b] + math.sqrt(sigmoid(g0)) * eps_0[b]
    logp = vdm_decoder_logprobs(z0, g0, values)
    k = np.round((x[b] + 1) * 127.5).astype(int)
    out["reconstruction"].append(-np.take_along_axis(logp, k[..., None], -1).sum())
    tb = t[b]
    if num_steps:
      tb = max(math.ceil(tb * num_steps), 1) / num_steps
    gt = gamma(tb)
    zt = math.sqrt(sigmoid(-gt)) * x[b] + math.sqrt(sigmoid(gt)) * eps[b]
    mse = np.sum((eps[b] - eps_model(zt, tb)) ** 2)
    if num_steps:  # (SNR(s) / SNR(t) - 1) T / 2, with SNR = exp(-gamma)
      snr_ratio = math.exp(-gamma(tb - 1 / num_steps)) / math.exp(-gt)
      out["diffusion"].append(0.5 * num_steps * (snr_ratio - 1) * mse)
    else:
      out["diffusion"].append(0.5 * derivative(gamma, tb) * mse)
  return {k: np.array(v) / (D * math.log(2)) for k, v in out.items()}


def vdm_posterior_step(z_t, x_hat, gamma_t, gamma_s, noise):
  """z_s ~ q(z_s | z_t, x = x_hat) (Kingma et al. 2021, Sec. 3.3): alpha_{t|s} = alpha_t /
  alpha_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2, mean alpha_{t|s} sigma_s^2 /
  sigma_t^2 z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x_hat, variance sigma_{t|s}^2 sigma_s^2 /
  sigma_t^2."""
  a_t, s_t = math.sqrt(sigmoid(-gamma_t)), math.sqrt(sigmoid(gamma_t))
  a_s, s_s = math.sqrt(sigmoid(-gamma_s)), math.sqrt(sigmoid(gamma_s))
  a_ts = a_t / a_s
  var_ts = s_t**2 - a_ts**2 * s_s**2
  mean = a_ts * s_s**2 / s_t**2 * z_t + a_s * var_ts / s_t**2 * x_hat
  return mean + math.sqrt(var_ts * s_s**2 / s_t**2) * noise


# ----------------------------------------------------------------------------- EDM


def edm_precond(sigma, sigma_data=0.5):
  """Karras et al. 2022, Table 1."""
  c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
  c_out = sigma * sigma_data / math.sqrt(sigma_data**2 + sigma**2)
  c_in = 1 / math.sqrt(sigma**2 + sigma_data**2)
  c_noise = math.log(sigma) / 4
  return c_skip, c_out, c_in, c_noise


def edm_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
  out = []
  for i in range(n):
    frac = i / (n - 1) if n > 1 else 0.0
    out.append(
      (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    )
  return np.array(out + [0.0])


def edm_step(x, sigma, sigma_next, denoise, gamma=0.0, z=None, s_noise=1.0):
  """Karras et al. 2022, Alg. 2 lines 4-10 (Alg. 1 when gamma = 0), one step."""
  sigma_hat = sigma * (1 + gamma)
  x_hat = x if gamma == 0 else x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * z
  d = (x_hat - denoise(x_hat, sigma_hat)) / sigma_hat
  x_next = x_hat + (sigma_next - sigma_hat) * d
  if sigma_next != 0:
    d_prime = (x_next - denoise(x_next, sigma_next)) / sigma_next
    x_next = x_hat + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_prime)
  return x_next


def edm_network_time(sigma, sigma_min=0.002, sigma_max=80.0, scale=1000.0):
  """jaxdiff's time for an EDM backbone: ln sigma affinely from [ln sigma_min, ln sigma_max] to
  [0, scale] (c_noise = ln(sigma) / 4 rescaled)."""
  span = math.log(sigma_max) - math.log(sigma_min)
  return scale * (math.log(sigma) - math.log(sigma_min)) / span


def edm_process_loss(network, y, sigma, noise, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0):
  """Per example: lambda(sigma) mean((D(y + sigma n) - y)^2) with D = c_skip x + c_out
  network(c_in x, time), Karras et al. 2022 eq. 2, 7, 8 and Table 1; ``network(x, time)`` on one
  example."""
  out = []
  for yi, s, ni in zip(y, sigma, noise, strict=True):
    c_skip, c_out, c_in, _ = edm_precond(s, sigma_data)
    x = yi + s * ni
    d = c_skip * x + c_out * network(c_in * x, edm_network_time(s, sigma_min, sigma_max))
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    out.append(weight * np.mean((d - yi) ** 2))
  return np.array(out)


# ----------------------------------------------------------------------------- Gaussian data


def gaussian_logpdf(x, mean, cov):
  """log N(x; mean, cov) per row of x [B, D]."""
  inv, (_, logdet) = np.linalg.inv(cov), np.linalg.slogdet(cov)
  diff = x - mean
  quad = np.einsum("bi,ij,bj->b", diff, inv, diff)
  return -0.5 * quad - 0.5 * logdet - 0.5 * x.shape[1] * math.log(2 * math.pi)


def gaussian_denoiser(x, sigma, mu, s):
  """E[y | y + sigma n = x] for y ~ N(mu, s^2): the precision-weighted mean."""
  return (x / sigma**2 + mu / s**2) / (1 / sigma**2 + 1 / s**2)


# ----------------------------------------------------------------------------- Lin et al. 2024


def zero_terminal_snr(betas):
  """Alg. 1, step by step with Python floats."""
  ab, acc = [], 1.0
  for b in betas:
    acc *= 1 - b
    ab.append(acc)
  root = [math.sqrt(a) for a in ab]
  a0, a_t = root[0], root[-1]
  root = [(r - a_t) * a0 / (a0 - a_t) for r in root]
  ab = [r * r for r in root]
  alphas = [ab[0]] + [ab[i] / ab[i - 1] for i in range(1, len(ab))]
  return np.array([1 - a for a in alphas])


def trailing(T, S):
  """Table 2's expression on steps 1..T, shifted to indices 0..T-1."""
  return (np.round(np.flip(np.arange(T, 0, -T / S))).astype(np.int64) - 1).tolist()


# ----------------------------------------------------------------------------- flow matching


def flow_shift(t, f):
  """SD3 eq. 23 in the form sigma / alpha scaled by f: t' / (1 - t') = f t / (1 - t)."""
  out = []
  for u in np.ravel(np.asarray(t, np.float64)):
    ratio = f * u / (1.0 - u) if u < 1 else math.inf
    out.append(1.0 if ratio == math.inf else ratio / (1.0 + ratio))
  return np.array(out).reshape(np.shape(t))


def logit_normal_cdf(t, m=0.0, s=1.0):
  """P(sigmoid(m + s n) <= t) = Phi((logit(t) - m) / s), per element."""
  out = []
  for u in np.ravel(t):
    z = (math.log(u / (1 - u)) - m) / s
    out.append(0.5 * (1 + math.erf(z / math.sqrt(2))))
  return np.array(out)


def flow_gaussian_velocity(x, t, mu, sd):
  """E[eps - x0 | x_t = x] for x0 ~ N(mu, sd^2), x_t = (1 - t) x0 + t eps: from the joint
  Gaussian of (x0, eps, x_t), the two regressions on x_t."""
  var = (1 - t) ** 2 * sd**2 + t**2
  e_eps = t * (x - (1 - t) * mu) / var  # Cov(eps, x_t) / Var(x_t)
  e_x0 = mu + (1 - t) * sd**2 * (x - (1 - t) * mu) / var
  return e_eps - e_x0


def flow_ode(x, grid, velocity, method):
  """Integrates dx/dt = velocity(x, t) from grid[-1] down to grid[0], step by step in float64:
  'euler' or 'heun' (the trapezoid with an Euler predictor, every step corrected)."""
  x = np.asarray(x, np.float64)
  for k in range(len(grid) - 1, 0, -1):
    t, t_next = grid[k], grid[k - 1]
    v = velocity(x, t)
    x_euler = x + (t_next - t) * v
    x = x_euler if method == "euler" else x + (t_next - t) * (v + velocity(x_euler, t_next)) / 2
  return x


def flow_ddim(x, grid, velocity, eta, noises):
  """Generalised DDIM on the flow path (alpha = 1 - t, sigma = t) in float64, from grid[-1] down
  to grid[0]; ``noises[j]`` is step j's z. The posterior q(x_s | x_t, x0) standard deviation comes
  from the product of the two Gaussians N(x_s; alpha_s x0, sigma_s^2) N(x_t; alpha_{t|s} x_s,
  sigma_{t|s}^2) (its precision is the sum of theirs), not from the closed form."""
  x = np.asarray(x, np.float64)
  for j, k in enumerate(range(len(grid) - 1, 0, -1)):
    t, s = grid[k], grid[k - 1]
    v = velocity(x, t)
    x0 = x - t * v
    eps = (x - (1 - t) * x0) / t
    if s == 0:
      x = x0
      continue
    a_ts = (1 - t) / (1 - s)
    var_ts = t**2 - a_ts**2 * s**2
    post_var = 1.0 / (1.0 / s**2 + a_ts**2 / var_ts)
    c = eta * math.sqrt(post_var)
    x = (1 - s) * x0 + math.sqrt(s**2 - c**2) * eps + c * np.asarray(noises[j], np.float64)
  return x


def dpmpp_2m_path(x, levels, alpha, sigma, x0_of):
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in float64 along any Gaussian path
  ``x = alpha(l) y + sigma(l) eps``, from ``levels[-1]`` down to ``levels[0]``; ``x0_of(x, l)`` is
  the data prediction. First order on the first step and into levels[0]; a step from pure noise
  (alpha = 0) has h = inf, so the step after it is first order as well; a step into the data
  (sigma = 0) returns the data prediction."""
  x = np.asarray(x, np.float64)
  lam = lambda v: math.log(alpha(v) / sigma(v))  # noqa: E731
  prev_x0 = h_prev = None
  for k in range(len(levels) - 1, 0, -1):
    lv, l_next = levels[k], levels[k - 1]
    x0 = x0_of(x, lv)
    if sigma(l_next) == 0:
      return x0
    a_n, s_n = alpha(l_next), sigma(l_next)
    if alpha(lv) == 0:  # lambda = -inf: exp(-h) = 0
      x, h = s_n / sigma(lv) * x + a_n * x0, math.inf
    else:
      h = lam(l_next) - lam(lv)
      r = h_prev / h if h_prev is not None else None
      first = k == len(levels) - 1 or k == 1 or math.isinf(r)
      d = x0 if first else (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
      x = (s_n / sigma(lv)) * x - a_n * math.expm1(-h) * d
    prev_x0, h_prev = x0, h
  return x


def flow_dpmpp_2m(x, grid, velocity):
  """:func:`dpmpp_2m_path` on the flow path (alpha = 1 - t, sigma = t; velocity v = eps - x0)."""
  return dpmpp_2m_path(x, grid, lambda t: 1 - t, lambda t: t, lambda x, t: x - t * velocity(x, t))

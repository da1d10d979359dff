"""Synthetic(alpha, beta) and Synthetic-IID of FedProx (Li et al., MLSys 2020).

Follows Section 5.1 / Appendix C.1 of "Federated Optimization in
Heterogeneous Networks" and, where the paper is ambiguous, its reference
generators (GitHub ``litian96/FedProx`` at commit ``3eed82eb``:
``data/synthetic_{0_0,0.5_0.5,1_1}/generate_synthetic.py`` and
``data/synthetic_iid/generate_iid.py``), which I read to check:

  * ``n_k = int(lognormal(mean=4, sigma=2)) + 50`` examples per device.
  * ``u_k ~ N(0, alpha)`` and ``B_k ~ N(0, beta)`` are scalars per device, and
    ``alpha``, ``beta`` are **standard deviations** (``np.random.normal(0,
    alpha)``).
  * ``W_k [d, C]`` and ``b_k [C]`` are elementwise ``N(u_k, 1)``: the same
    ``u_k`` is the mean of both (``mean_b = mean_W``).
  * ``v_k [d]`` is elementwise ``N(B_k, 1)``, one per device (not shared).
  * ``x ~ N(v_k, Sigma)`` with ``Sigma`` diagonal, ``Sigma_jj = j^-1.2``
    (``j = 1..d``) a **variance**, so the per-feature std is ``j^-0.6``.
  * ``y = argmax(softmax(x W_k + b_k)) = argmax(x W_k + b_k)``.
  * Synthetic-IID (``generate_iid.py``): one global ``W, b ~ N(0, 1)`` and
    ``x ~ N(0, Sigma)`` on every device; alpha and beta play no part. (The
    ``iid=1`` branch of ``generate_synthetic.py`` instead sets ``v_k = B_k``;
    both agree at ``beta = 0``, the only IID setting the paper uses.)
  * Draw order as the reference: sizes, ``u``, ``B``, all ``v_k``, then per
    device ``W_k``, ``b_k``, ``x``. Numbers differ from the reference, which
    uses the global legacy ``np.random``; here one
    ``np.random.default_rng(seed)`` draws everything, and ``x`` is drawn as
    ``v_k + sqrt(diag Sigma) * z`` (equal in law to ``multivariate_normal``
    with a diagonal covariance).

The reference then shuffles each device's examples and keeps 90% for
training; use ``FederatedDataset.split_examples([0.9, 0.1], seed)`` for that.
"""

from __future__ import annotations

from typing import Union

import numpy as np

from fedjax_pfi.data import partition
from fedjax_pfi.data.federated import FederatedDataset


def synthetic(alpha: float, beta: float, num_clients: int = 30,
              num_features: int = 60, num_classes: int = 10, seed: int = 0,
              iid: bool = False, return_params: bool = False
              ) -> Union[FederatedDataset, tuple[FederatedDataset, dict]]:
  """Generates FedProx's Synthetic(alpha, beta) or Synthetic-IID data.

  Args:
    alpha: std of the per-device model mean ``u_k`` (model heterogeneity).
    beta: std of the per-device feature mean ``B_k`` (feature heterogeneity).
      For ``iid=True`` both must be 0 (Synthetic-IID has neither).
    num_clients: devices ``K`` (30 in the paper).
    num_features: ``d`` (60).
    num_classes: ``C`` (10).
    seed: seed of the one ``np.random.default_rng`` used.
    iid: Synthetic-IID instead of Synthetic(alpha, beta).
    return_params: also return the generating parameters.

  Returns:
    A `FederatedDataset` with ``x`` float32 ``[n, d]``, ``y`` int32 ``[n]``,
    clients ``'f_00000'``... (the reference's names) and
    ``metadata['num_classes'] = C``. With ``return_params``, also a dict of
    float64 arrays: ``W [K, d, C]``, ``b [K, C]``, ``v [K, d]``, ``u [K]``,
    ``B [K]``, ``sigma_diag [d]``. Labels are computed from the stored
    float32 ``x`` (in float64), so ``y == argmax(x @ W[k] + b[k])`` exactly.
  """
  for name, val in (('alpha', alpha), ('beta', beta)):
    if not np.isfinite(val) or val < 0:
      raise ValueError(f'{name} must be a finite number >= 0, got {val!r}.')
  for name, val in (('num_clients', num_clients),
                    ('num_features', num_features),
                    ('num_classes', num_classes)):
    if int(val) != val or val < 1:
      raise ValueError(f'{name} must be a positive integer, got {val!r}.')
  if iid and (alpha != 0 or beta != 0):
    raise ValueError(
        f'Synthetic-IID has no alpha/beta; pass alpha=0, beta=0 with iid=True '
        f'(got alpha={alpha}, beta={beta}).')
  k_, d, c = int(num_clients), int(num_features), int(num_classes)
  rng = np.random.default_rng(seed)
  sizes = rng.lognormal(4, 2, k_).astype(np.int64) + 50
  sigma_diag = np.arange(1, d + 1, dtype=np.float64) ** -1.2
  if iid:
    u = np.zeros(k_)
    b_mean = np.zeros(k_)
    v = np.zeros((k_, d))
    w_global = rng.normal(0, 1, (d, c))
    b_global = rng.normal(0, 1, c)
  else:
    u = rng.normal(0, alpha, k_)
    b_mean = rng.normal(0, beta, k_)
    v = rng.normal(b_mean[:, None], 1, (k_, d))
  ws, bs, xs, ys = [], [], [], []
  for k in range(k_):
    if iid:
      w, b = w_global, b_global
    else:
      w = rng.normal(u[k], 1, (d, c))
      b = rng.normal(u[k], 1, c)
    x = v[k] + np.sqrt(sigma_diag) * rng.standard_normal((sizes[k], d))
    # Label the stored float32 features, so y matches x exactly.
    x = x.astype(np.float32)
    ws.append(w)
    bs.append(b)
    xs.append(x)
    ys.append(np.argmax(x.astype(np.float64) @ w + b, axis=1))
  ds = FederatedDataset.from_clients(
      [{'x': x, 'y': y.astype(np.int32)}
       for x, y in zip(xs, ys)],
      [f'f_{k:05d}' for k in range(k_)],
      {'num_classes': c, 'num_features': d, 'alpha': float(alpha),
       'beta': float(beta), 'iid': bool(iid), 'seed': seed})
  if not return_params:
    return ds
  params = {'W': np.stack(ws), 'b': np.stack(bs), 'v': v, 'u': u,
            'B': b_mean, 'sigma_diag': sigma_diag}
  return ds, params


def emnist_shaped(num_clients: int, seed: int = 0, *, mean_examples=100.0,
                  sigma=0.7, min_examples=10, max_examples=400,
                  label_alpha=0.3) -> FederatedDataset:
  """The throughput benchmarks' population (issue 4): EMNIST-shaped inputs
  (28x28x1 uniform noise, 62 classes), examples per client lognormal with
  mean ``mean_examples`` and log-sd ``sigma``, rounded and clipped to
  ``[min_examples, max_examples]``, each client's labels from its own
  Dirichlet(``label_alpha``) over the classes. It measures speed, not
  learning."""
  rng = np.random.default_rng(seed)
  mu = np.log(mean_examples) - sigma**2 / 2  # so that the mean is as asked
  sizes = np.clip(np.round(rng.lognormal(mu, sigma, num_clients)),
                  min_examples, max_examples).astype(np.int64)
  labels = np.concatenate([
      rng.choice(62, size=k, p=rng.dirichlet(np.full(62, label_alpha)))
      for k in sizes]).astype(np.int32)
  x = rng.random((int(sizes.sum()), 28, 28, 1), dtype=np.float32)
  return FederatedDataset.from_client_index(
      {'x': x, 'y': labels}, np.repeat(np.arange(num_clients), sizes),
      metadata={'num_classes': 62})


def cifar_shaped(num_clients: int = 20, alpha: float = 0.1, *,
                 num_examples: int = 6000, num_classes: int = 10,
                 noise: float = 15.0, seed: int = 0) -> FederatedDataset:
  """CIFAR-shaped mock data split by Dirichlet(``alpha``) over labels.

  The stand-in for CIFAR-10 in PFLlib-style personalization benchmarks
  when the real images cannot be downloaded: ``num_examples`` 32x32x3
  images, labels uniform over ``num_classes``; every class has a fixed
  random prototype image (standard normal pixels) and an example is its
  class's prototype plus ``noise`` times standard normal pixels, divided by
  ``sqrt(1 + noise^2)`` (unit pixel variance). At ``noise`` 15 a linear
  classifier trained centrally on 80% of the examples scores 0.74 on the
  rest (1.00 at 5, 0.46 at 20), so the task is learnable but not trivial.
  Clients get the examples of `partition.dirichlet` with ``alpha`` (0.1:
  most clients hold one to three classes).
  """
  rng = np.random.default_rng(seed)
  prototypes = rng.standard_normal((num_classes, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, num_classes, num_examples).astype(np.int32)
  x = (prototypes[y] + noise * rng.standard_normal(
      (num_examples, 32, 32, 3)).astype(np.float32)) / np.float32(
          np.sqrt(1.0 + noise**2))
  index, names = partition.dirichlet(y, num_clients, alpha, seed, min_size=10)
  return FederatedDataset.from_client_index(
      {'x': x, 'y': y}, index, client_names=names,
      metadata={'num_classes': num_classes})

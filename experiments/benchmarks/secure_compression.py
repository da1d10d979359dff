r"""The error of compression under secure aggregation (issue 16).

  python -m experiments.benchmarks.secure_compression

One round of ``--clients`` clients (uniform weights), each message a
Gaussian vector of ``--dim`` floats with norm ``--norm`` times the clip
norm (1), through `rounds.message_sums` and the wrapped aggregator's
``finalize`` (the same path as a training round): ``qsgd`` (the protocol's
fixed point with ``2^(b-1) - 1`` levels of the clip) and ``rotated_qsgd``
(one shared rotation, levels of ``beta``), for each ``b`` of ``--bits``.
Prints the decoded mean's error ``||mean_hat - mean||^2 / ||mean||^2``
(over ``--repeats`` rounds), the clamped coordinates, the modulus the
cohort needs (``secure_aggregation.bits``) and the masked input's bytes per
client, against the float32 message's. No timing.
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_pfi import compression
from fedjax_pfi import secure_aggregation as sa
from fedjax_pfi.algorithms import aggregators
from fedjax_pfi.algorithms import rounds

_DIM = flags.DEFINE_integer('dim', 2**16, 'Floats a message.')
_CLIENTS = flags.DEFINE_integer('clients', 10, 'Clients a round.')
_BITS = flags.DEFINE_list('bits', ['2', '4', '8'], 'compression.bits.')
_NORM = flags.DEFINE_float('norm', 0.5, 'Message norm / clip norm.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Rounds (keys) per setting.')


def round_error(name: str, bits: int, d: int, c: int, norm: float,
                repeats: int) -> dict:
  # the smallest modulus that holds c clients' levels (weights 1)
  modulus = next(b for b in range(bits + 1, 33)
                 if c * 2.0**(bits - 1) <= 2.0**(b - 1) - 1)
  spec = sa.make_spec(bits=modulus, neighbors=0, clip_norm=1.0,
                      max_weight=1.0, slots=c, compressor=name,
                      compressor_bits=bits)
  agg = compression.wrap(
      sa.wrap(aggregators.weighted_mean('uniform'), spec),
      compression.Spec(compression.make(name, bits=bits)))
  ids = np.arange(c)
  plan = sa.plan(spec, ids, np.ones(c, np.float32), np.zeros(c, np.int8),
                 0, 0)
  rows = sa.Plan(*(jnp.asarray(x) for x in plan))

  @jax.jit
  def run(m, rk, ck):
    keys = jax.vmap(lambda i: jax.random.fold_in(ck, i))(jnp.asarray(ids))
    w = jnp.ones(c, jnp.float32)
    sums = rounds.message_sums(agg, (), {'v': m}, w, keys,
                               ids=jnp.asarray(ids), secure_rows=rows,
                               round_key=rk)
    sums['weight'] = jnp.sum(w)
    mean, _, metrics = agg.finalize(sums, (), rounds.aggregator_key(rk))
    return mean['v'], metrics['compression/clamped_coordinates']

  rng = np.random.default_rng(0)
  errs, clamped = [], 0.0
  for r in range(repeats):
    m = rng.normal(size=(c, d)).astype(np.float32)
    m *= norm / np.linalg.norm(m, axis=1, keepdims=True)
    exact = m.mean(0)
    got, k = run(jnp.asarray(m), jax.random.key(r), jax.random.key(1000 + r))
    errs.append(float(np.sum((np.asarray(got) - exact) ** 2) /
                      np.sum(exact ** 2)))
    clamped += float(k)
  return {'error': float(np.mean(errs)), 'clamped': clamped,
          'modulus': modulus,
          'bytes': sa.client_bytes(spec, d)['masked_input']}


def main(argv):
  del argv
  d, c = _DIM.value, _CLIENTS.value
  n = compression.next_pow2(d)
  beta = compression.rotated_bound(1.0, n)
  print(f'jax {jax.__version__}; d = {d:,} (rotated {n:,}), {c} clients, '
        f'message norm {_NORM.value} x clip; beta / C = {beta:.4f} '
        f'(range {1 / beta:.1f}x narrower); float32 message '
        f'{4 * d:,} bytes')
  print('| compressor | bits | modulus bits | masked input bytes | '
        'error of the mean | clamped coordinates |')
  print('| --- | --- | --- | --- | --- | --- |')
  for b in (int(x) for x in _BITS.value):
    for name in compression.SECURE_NAMES:
      r = round_error(name, b, d, c, _NORM.value, _REPEATS.value)
      print(f"| {name} | {b} | {r['modulus']} | {r['bytes']:,} | "
            f"{r['error']:.4g} | {r['clamped']:.0f} |")


if __name__ == '__main__':
  app.run(main)

"""How to formulate one FedAvg round in JAX on XLA:CPU: a timing study.

Workload: the FedAvg paper's CNN (and 2NN MLP) on FEMNIST-shaped random data
(``[B, 28, 28, 1]``, 62 classes); ``C`` clients each do ``S`` local SGD steps
of batch ``B`` from the same broadcast params; the round's output is the mean
client delta.

Formulations (all federated ones produce the same mean delta; checked first):

  a   Python loop over clients and steps, one jitted SGD step (baseline)
  a_p as a, PatchConv                                         (CNN only)
  h   Python loop over clients, one jitted client update (S steps
      unrolled) per client
  hs  Python loop over clients, one jitted client update (lax.scan over
      S steps) per client: the known-slow "scan" case, without vmap
  hs_p as hs, PatchConv                                       (CNN only)
  b   one jit: vmap over clients of lax.scan over steps, nn.Conv
  c   one jit: vmap over clients of Python-unrolled steps, nn.Conv
  d   as b, PatchConv                                         (CNN only)
  e   as c, PatchConv                                         (CNN only)
  i   one jit: lax.map (sequential scan) over clients of unrolled steps
  f   one jit: Python loop over clients of unrolled steps (C*S steps, no vmap)
  g   centralized: a jitted step on a batch of C*B examples, S times
      (the ceiling for the same number of examples; not a FedAvg round)
  g_p as g, PatchConv                                         (CNN only)

Timing: ahead-of-time compile (lower + compile reported as "compile s"), one
warm-up call each, then ``--repeats`` rounds per formulation, interleaved
(round-robin, order rotated every repeat) in this one process; medians.

Runs used (about 10 min each on 2 cores; b/hs/i dominate, f compiles
C*S steps: 12 s at C=10, ~2 min at C=50):
  .venv/bin/python experiments/benchmarks/cnn_formulation.py --models cnn \
      --C 10 --repeats 3 --skip_timing_lr_check
  .venv/bin/python experiments/benchmarks/cnn_formulation.py --models cnn \
      --C 50 --variants a,h,hs_p,c,d,e,f,g --repeats 2 --skip_timing_lr_check
  .venv/bin/python experiments/benchmarks/cnn_formulation.py --models mlp \
      --C 50 --repeats 15

Findings (jax/jaxlib 0.10.2, XLA:CPU, 2-core AMD EPYC, S=8, B=20), median
s/round relative to a:
  CNN C=10: hs_p 0.87, f 0.93, d 1.05, h 1.14, e 1.18, a_p 1.25, g 1.40,
            c 3.5, hs 8.2, i 8.2, b 15.7.
  CNN C=50: f 0.75 (compile 129 s), hs_p 0.82, h 1.09, e 1.09, d 1.12,
            g 1.51, c 7.8.
  MLP C=50: g 0.36, h 0.71, hs 0.74, a 1, i 1.13, b 1.46, c 1.59.
Inside a while loop (lax.scan / lax.map) the backward-pass convolutions of
nn.Conv keep non-canonical dim_labels (e.g. f01b_i01o->01bf) and are not
turned into YNNPACK fusions, unlike in straight-line code; hence any
scan/map over CNN steps is ~8x slower. PatchConv(method='slices') has no
convolution op, so it is fast in scans and under vmap over clients (where
nn.Conv becomes a grouped conv: c, ~3.5-8x). --xla_cpu_use_thunk_runtime is
ignored by this jaxlib ("no longer supported"); it changed nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
from fedjax_pfi.models.zoo import CNN, MLP  # pylint: disable=g-import-not-at-top

NUM_CLASSES = 62
LR0 = jnp.float32(0.1)  # only its shape/dtype matter for compiling


DESCRIPTIONS = {
    'a': 'py loop clients x steps, jit(step)',
    'a_p': 'as a, PatchConv',
    'h': 'py loop clients, jit(client: S unrolled)',
    'hs': 'py loop clients, jit(client: scan S steps)',
    'hs_p': 'as hs, PatchConv',
    'b': 'jit vmap(clients) scan(steps) [nn.Conv]',
    'c': 'jit vmap(clients) unrolled(steps) [nn.Conv]',
    'd': 'as b, PatchConv',
    'e': 'as c, PatchConv',
    'i': 'jit lax.map(clients) unrolled(steps)',
    'f': 'jit py-loop(clients) unrolled(steps)',
    'g': 'centralized jit(step) on C*B, S times',
    'g_p': 'as g, PatchConv',
}
CNN_VARIANTS = ('a', 'a_p', 'h', 'hs', 'hs_p', 'b', 'c', 'd', 'e', 'i', 'f', 'g', 'g_p')
MLP_VARIANTS = ('a', 'h', 'hs', 'b', 'c', 'i', 'g')
PATCH_VARIANTS = ('a_p', 'hs_p', 'd', 'e', 'g_p')
CENTRALIZED = ('g', 'g_p')


def make_fns(module):
  """Per-step, per-client and per-round pure functions for one module.

  The learning rate is a traced argument, so one compiled function serves
  both the correctness check (at a small, numerically tame lr) and timing.
  """

  def loss(params, x, y):
    logits = module.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, x, y, lr):
    g = jax.grad(loss)(params, x, y)
    return jax.tree.map(lambda p, gi: p - lr * gi, params, g)

  def client_scan(params, xs, ys, lr):
    def body(p, batch):
      return step(p, *batch, lr), None
    p, _ = jax.lax.scan(body, params, (xs, ys))
    return jax.tree.map(jnp.subtract, p, params)

  def client_unroll(params, xs, ys, lr):
    p = params
    for s in range(xs.shape[0]):
      p = step(p, xs[s], ys[s], lr)
    return jax.tree.map(jnp.subtract, p, params)

  def round_vmap(client_fn):
    def f(params, X, Y, lr):
      deltas = jax.vmap(client_fn, in_axes=(None, 0, 0, None))(
          params, X, Y, lr)
      return jax.tree.map(lambda d: d.mean(axis=0), deltas)
    return f

  def round_map(params, X, Y, lr):
    deltas = jax.lax.map(lambda xy: client_unroll(params, *xy, lr), (X, Y))
    return jax.tree.map(lambda d: d.mean(axis=0), deltas)

  def round_pyloop(params, X, Y, lr):
    acc = jax.tree.map(jnp.zeros_like, params)
    for c in range(X.shape[0]):
      d = client_unroll(params, X[c], Y[c], lr)
      acc = jax.tree.map(jnp.add, acc, d)
    return jax.tree.map(lambda a: a / X.shape[0], acc)

  return dict(step=step, client_unroll=client_unroll,
              client_scan=client_scan,
              vmap_scan=round_vmap(client_scan),
              vmap_unroll=round_vmap(client_unroll),
              map_unroll=round_map, pyloop=round_pyloop)


def aot(fn, *args):
  """jit + lower + compile; returns (compiled, seconds)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - t0


def build_variant(name, fns_by_conv, params, X, Y, Xs, Ys, Xc, Yc):
  """Returns (run: lr -> output pytree, compile_seconds)."""
  conv = 'patch' if name in PATCH_VARIANTS else 'lax'
  fns = fns_by_conv[conv]
  C, S = X.shape[:2]
  if name in ('a', 'a_p'):
    step, t1 = aot(fns['step'], params, Xs[0][0], Ys[0][0], LR0)
    acc_fn, t2 = aot(lambda acc, p, p0: jax.tree.map(
        lambda a, q, q0: a + (q - q0), acc, p, p0), params, params, params)
    fin, t3 = aot(lambda acc: jax.tree.map(lambda a: a / C, acc), params)
    zeros = jax.tree.map(jnp.zeros_like, params)

    def run(lr):
      acc = zeros
      for c in range(C):
        p = params
        for s in range(S):
          p = step(p, Xs[c][s], Ys[c][s], lr)
        acc = acc_fn(acc, p, params)
      return fin(acc)
    return run, t1 + t2 + t3
  if name in ('h', 'hs', 'hs_p'):
    client, t1 = aot(fns['client_unroll' if name == 'h' else 'client_scan'],
                     params, X[0], Y[0], LR0)
    acc_fn, t2 = aot(lambda acc, d: jax.tree.map(jnp.add, acc, d),
                     params, params)
    fin, t3 = aot(lambda acc: jax.tree.map(lambda a: a / C, acc), params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    Xcl = [X[c] for c in range(C)]
    Ycl = [Y[c] for c in range(C)]

    def run(lr):
      acc = zeros
      for c in range(C):
        acc = acc_fn(acc, client(params, Xcl[c], Ycl[c], lr))
      return fin(acc)
    return run, t1 + t2 + t3
  if name in ('g', 'g_p'):
    step, t = aot(fns['step'], params, Xc[0], Yc[0], LR0)

    def run(lr):
      p = params
      for s in range(S):
        p = step(p, Xc[s], Yc[s], lr)
      return p
    return run, t
  key = {'b': 'vmap_scan', 'd': 'vmap_scan', 'c': 'vmap_unroll',
         'e': 'vmap_unroll', 'i': 'map_unroll', 'f': 'pyloop'}[name]
  rnd, t = aot(fns[key], params, X, Y, LR0)
  return (lambda lr: rnd(params, X, Y, lr)), t


def bench_model(model_name, args):
  C, S, B = args.C, args.S, args.B
  rng = np.random.default_rng(0)
  X = jnp.asarray(rng.standard_normal((C, S, B, 28, 28, 1), np.float32))
  Y = jnp.asarray(rng.integers(0, NUM_CLASSES, (C, S, B)), jnp.int32)
  # Host-side pre-split per (client, step) batches and centralized batches,
  # so no timed run pays for slicing.
  Xs = [[X[c, s] for s in range(S)] for c in range(C)]
  Ys = [[Y[c, s] for s in range(S)] for c in range(C)]
  Xc = [X[:, s].reshape(C * B, 28, 28, 1) for s in range(S)]
  Yc = [Y[:, s].reshape(C * B) for s in range(S)]
  jax.block_until_ready((X, Y, Xs, Ys, Xc, Yc))

  if model_name == 'cnn':
    modules = {'lax': CNN(NUM_CLASSES, conv='lax'),
               'patch': CNN(NUM_CLASSES, conv='patches',
                            patch_method=args.patch_method)}
    variants = [v for v in CNN_VARIANTS if v in args.variants]
  else:
    modules = {'lax': MLP(NUM_CLASSES), 'patch': MLP(NUM_CLASSES)}
    variants = [v for v in MLP_VARIANTS if v in args.variants]
  params = modules['lax'].init(jax.random.key(0), X[0, 0])
  fns_by_conv = {k: make_fns(m) for k, m in modules.items()}
  nparams = sum(p.size for p in jax.tree.leaves(params))
  print(f'\n=== {model_name}: {nparams:,} params; C={C} S={S} B={B} '
        f'lr={args.lr}; patch method={args.patch_method} ===', flush=True)

  runs, compile_s = {}, {}
  for v in variants:
    runs[v], compile_s[v] = build_variant(
        v, fns_by_conv, params, X, Y, Xs, Ys, Xc, Yc)
    print(f'  compiled {v:4s} in {compile_s[v]:7.2f} s', flush=True)

  # Correctness: every federated formulation gives the same mean delta.
  # Float-level differences between formulations (summation order) flip a
  # few ReLU / max-pool decisions somewhere among the C*S*B*H*W*channels
  # units, and fitting random labels amplifies that: at C=10 and
  # --check_lr=0.01 formulations agree to ~1e-6 (rel L2), at C=50 one or two
  # clients diverge and the mean delta differs by ~2e-3 rel L2 (at lr=0.1,
  # ~1e-3 already at C=10). A formulation bug (kernel ordering, averaging)
  # gives O(1) differences, hence --tol=1e-2. The timing-lr diffs are
  # printed too, as information. These calls also serve as warm-up.
  lr_check = jnp.float32(args.check_lr)
  lr = jnp.float32(args.lr)
  fed = [v for v in variants if v not in CENTRALIZED]
  ok = True
  passes = [(lr_check, 'check lr', True)]
  if not args.skip_timing_lr_check:
    passes.append((lr, 'timing lr', False))
  for lr_v, label, enforce in passes:
    outs = {v: jax.block_until_ready(runs[v](lr_v)) for v in variants}
    if not fed:
      continue
    ref = outs[fed[0]]
    ref_norm = float(jnp.sqrt(sum(jnp.sum(leaf * leaf)
                                  for leaf in jax.tree.leaves(ref))))
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(ref))
    print(f'  {label} {float(lr_v):g}: mean delta vs {fed[0]} '
          f'(max |delta| {scale:.3e}, |delta| {ref_norm:.3e}):')
    for v in fed[1:]:
      diffs = [a - b for a, b in zip(jax.tree.leaves(outs[v]),
                                     jax.tree.leaves(ref))]
      err = max(float(jnp.max(jnp.abs(d))) for d in diffs)
      rel = float(jnp.sqrt(sum(jnp.sum(d * d) for d in diffs))) / ref_norm
      good = rel <= args.tol
      if enforce:
        ok &= good
      print(f'    {v:4s} max abs diff {err:.2e}, rel L2 diff {rel:.1e} '
            f'{("ok" if good else "MISMATCH") if enforce else ""}')
  if not ok:
    raise SystemExit('formulations disagree; not timing.')

  times = {v: [] for v in variants}
  for r in range(args.repeats):
    order = variants[r % len(variants):] + variants[:r % len(variants)]
    for v in order:
      t0 = time.perf_counter()
      jax.block_until_ready(runs[v](lr))
      times[v].append(time.perf_counter() - t0)
    print(f'  repeat {r + 1}/{args.repeats}: ' + ' '.join(
        f'{v}={times[v][-1]:.3f}' for v in variants), flush=True)

  med = {v: statistics.median(ts) for v, ts in times.items()}
  base_a = med.get('a')
  base_g = med.get('g')
  print(f'\n  {model_name}  (C={C} S={S} B={B}, {args.repeats} repeats)')
  print(f'  {"var":4s} {"formulation":44s} {"compile s":>9s} '
        f'{"med s/rnd":>9s} {"min":>7s} {"max":>7s} {"x vs a":>7s} '
        f'{"x vs g":>7s}')
  for v in variants:
    ra = f'{med[v] / base_a:7.2f}' if base_a else '      -'
    rg = f'{med[v] / base_g:7.2f}' if base_g else '      -'
    print(f'  {v:4s} {DESCRIPTIONS[v]:44s} {compile_s[v]:9.2f} '
          f'{med[v]:9.4f} {min(times[v]):7.4f} {max(times[v]):7.4f} '
          f'{ra} {rg}')
  print('  (x vs a / x vs g: median s/round divided by that of a / g; '
        '<1 is faster)', flush=True)
  return med, compile_s


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--C', type=int, default=50, help='clients per round')
  parser.add_argument('--S', type=int, default=8, help='local steps')
  parser.add_argument('--B', type=int, default=20, help='batch size')
  parser.add_argument('--lr', type=float, default=0.1)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--models', default='cnn,mlp')
  parser.add_argument('--variants', default=','.join(CNN_VARIANTS),
                      help='comma list of ' + ','.join(CNN_VARIANTS))
  parser.add_argument('--patch_method', default='slices',
                      choices=('patches', 'slices'),
                      help='PatchConv patch extractor for a_p/d/e/g_p')
  parser.add_argument('--check_lr', type=float, default=0.01,
                      help='lr for the correctness check')
  parser.add_argument('--skip_timing_lr_check', action='store_true',
                      help='skip the (informative) diff at the timing lr')
  parser.add_argument('--tol', type=float, default=1e-2,
                      help='max rel L2 diff of mean deltas at check_lr')
  args = parser.parse_args()
  args.variants = tuple(args.variants.split(','))

  print(f'jax {jax.__version__}, jaxlib {jaxlib.__version__}, '
        f'python {platform.python_version()}, backend '
        f'{jax.default_backend()}, devices {jax.devices()}, '
        f'os.cpu_count {os.cpu_count()}')
  print(f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  for m in args.models.split(','):
    bench_model(m, args)


if __name__ == '__main__':
  main()

"""Per-client evaluation equals a plain loop over clients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_pfi import evaluation
from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.models import zoo


def dataset():
  rng = np.random.default_rng(0)
  sizes = np.array([5, 0, 70, 1, 33, 9])  # one empty client, ragged sizes
  n = sizes.sum()
  x = rng.normal(size=(n, 7)).astype(np.float32)
  y = rng.integers(0, 3, n).astype(np.int32)
  return FederatedDataset.from_client_index(
      {'x': x, 'y': y}, np.repeat(np.arange(6), sizes),
      metadata={'num_classes': 3})


def test_shared_and_personal_match_plain_loop():
  ds = dataset()
  model = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata, hidden=(4,))
  params = model.init(jax.random.key(1))
  ev = evaluation.Evaluator(model, batch_size=8, clients_per_chunk=2)
  shared = ev.evaluate(params, ds)
  stacked = jax.tree.map(lambda p: jnp.stack([p] * ds.num_clients), params)
  personal = ev.evaluate(None, ds, personal_params=stacked)
  np.testing.assert_array_equal(shared.client_ids, [0, 2, 3, 4, 5])
  np.testing.assert_array_equal(personal.client_ids, shared.client_ids)
  for cid, loss, acc in zip(shared.client_ids, shared.loss, shared.accuracy):
    c = ds.client(cid)
    logits = model.apply(params, jnp.asarray(c['x']))
    want_loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, c['y']).mean()
    want_acc = np.mean(np.argmax(logits, -1) == c['y'])
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, want_acc, rtol=1e-6)
  np.testing.assert_allclose(personal.loss, shared.loss, rtol=1e-5)
  np.testing.assert_allclose(personal.accuracy, shared.accuracy, rtol=1e-6)


def test_personal_params_are_used_per_client():
  ds = dataset()
  model = zoo.build_model('logreg', ds.columns['x'][:2], ds.metadata)
  params = model.init(jax.random.key(0))
  # Client i's bias favours class i % 3 overwhelmingly: its accuracy is the
  # fraction of its labels equal to i % 3.
  stacked = jax.tree.map(lambda p: jnp.zeros((ds.num_clients,) + p.shape),
                         params)
  bias = np.zeros([ds.num_clients, 3], np.float32)
  bias[np.arange(ds.num_clients), np.arange(ds.num_clients) % 3] = 100.0
  stacked['Dense_0']['bias'] = jnp.asarray(bias)
  out = evaluation.Evaluator(model, batch_size=4, clients_per_chunk=4).evaluate(
      None, ds, personal_params=stacked)
  for cid, acc in zip(out.client_ids, out.accuracy):
    np.testing.assert_allclose(acc, np.mean(ds.client(cid)['y'] == cid % 3))


def test_summary_statistics_by_hand():
  m = evaluation.ClientMetrics(
      client_ids=np.arange(4), loss_sum=np.array([1.0, 2.0, 3.0, 4.0]),
      correct=np.array([1.0, 2.0, 0.0, 9.0]), count=np.array([2.0, 2.0, 1.0,
                                                              10.0]),
      num_examples=np.array([2, 2, 1, 10]))
  s = evaluation.summarize(m, 'test/')
  assert s['test/accuracy'] == 12.0 / 15.0           # pooled
  assert s['test/client_accuracy_mean'] == np.mean([0.5, 1.0, 0.0, 0.9])
  assert s['test/client_accuracy_worst'] == 0.0
  assert s['test/client_accuracy_median'] == 0.7
  assert s['test/num_clients'] == 4


def test_majority_baseline_ignores_padding():
  train = FederatedDataset.from_clients([{'x': np.zeros((2, 3)),
                                          'y': np.array([[5, 5, 0], [5, 7, 0]])}])
  test = FederatedDataset.from_clients([{'x': np.zeros((1, 3)),
                                         'y': np.array([[5, 7, 0]])}])
  assert evaluation.majority_baseline(train, test, pad_id=0) == 0.5

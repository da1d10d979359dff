"""The benchmarks run at tiny sizes and print what they claim."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lora_memory_benchmark_runs():
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.lora_memory',
       '--cohorts=2,6', '--batch=1', '--seq_len=4', '--dim=32', '--layers=1',
       '--heads=2', '--steps=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  slopes = dict(re.findall(r'^\s+(\w+)\s+[\d.]+ MB/client =\s+([\d.]+) x model',
                           out.stdout, re.M))
  assert set(slopes) == {'full', 'lora', 'lora_merge'}, out.stdout
  # Each client of full fine-tuning holds about two copies of the model;
  # with LoRA far less of it.
  assert float(slopes['full']) > 1.5
  assert float(slopes['lora']) < float(slopes['full']) / 3


def test_fedavg_throughput_benchmark_runs():
  """Tiny sizes; the printed padding efficiency and compilation count are
  the packed layout's (no timing is asserted)."""
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.fedavg_throughput',
       '--population=40', '--clients=8', '--lanes=2', '--chunk=1',
       '--rounds=2', '--warmup=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  eff = float(re.search(r'padding efficiency ([\d.]+)', out.stdout)[1])
  assert 0.8 < eff <= 1.0, out.stdout
  assert 'simulator compilations for the whole run: 1' in out.stdout
  assert 'simulator_dp compilations for the whole run: 1' in out.stdout
  assert 'simulator / simulator_dp throughput' in out.stdout
  for name in ('simulator', 'simulator_dp', 'python_loop', 'centralized'):
    assert re.search(rf'^{name}\s+[\d.]+', out.stdout, re.M), out.stdout
  assert 'simulator / centralized throughput' in out.stdout


def test_fedavg_throughput_benchmark_times_secure_aggregation():
  """Secure rounds on packed lanes compile once; the bytes model and the
  cost ratio are printed (no timing is asserted)."""
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.fedavg_throughput',
       '--population=40', '--clients=8', '--lanes=2', '--rounds=2',
       '--warmup=1', '--methods=simulator,simulator_secagg,'
       'simulator_secagg_rotated_qsgd', '--secagg_neighbors=4'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert ('simulator_secagg compilations for the whole run: 1; 4 neighbours'
          in out.stdout), out.stdout
  upload = int(re.search(r'upload ([\d,]+) \(masked', out.stdout)[1].replace(
      ',', ''))
  masked = int(re.search(r'masked input ([\d,]+)', out.stdout)[1].replace(
      ',', ''))
  assert upload == masked + 64 + 112 * 4  # keys, shares, unmasking shares
  assert 'simulator / simulator_secagg throughput' in out.stdout
  # with the rotated compressor's levels: d' values masked, one compile
  assert ('simulator_secagg_rotated_qsgd compilations for the whole run: 1'
          in out.stdout), out.stdout
  assert 'simulator / simulator_secagg_rotated_qsgd throughput' in out.stdout


def test_fedavg_throughput_benchmark_times_robust_aggregation():
  """Robust rounds on packed lanes compile once and print their cost
  ratio beside the plain round (no timing is asserted)."""
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.fedavg_throughput',
       '--population=40', '--clients=8', '--lanes=2', '--rounds=2',
       '--warmup=1', '--robust_f=2',
       '--methods=simulator,simulator_robust_krum,simulator_robust_median'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  for rule in ('krum', 'median'):
    assert (f'simulator_robust_{rule} compilations for the whole run: 1; '
            'buffer 8 x') in out.stdout, out.stdout
    assert f'simulator / simulator_robust_{rule} throughput' in out.stdout


def test_large_cohort_benchmark_matches_unchunked():
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.large_cohort',
       '--clients=60', '--lanes=6', '--chunk=2', '--compare_unchunked'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert '60 clients, ' in out.stdout
  diff = float(re.search(r'max \|param difference\| ([\d.e+-]+)',
                         out.stdout)[1])
  assert diff < 1e-5, out.stdout
  temps = [float(t) for t in re.findall(r'XLA temporaries ([\d.]+) MiB',
                                        out.stdout)]
  assert len(temps) == 2 and temps[0] < temps[1], out.stdout  # chunk < all


def test_step_floor_benchmark_runs():
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.step_floor',
       '--steps=10', '--lanes=2', '--central_batch=100', '--repeats=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  names = re.findall(r'^(\w+)\s+[\d.]+\s+[\d.]+x$', out.stdout, re.M)
  assert names == ['python_loop', 'scan_1_lane', 'scan_2_lanes',
                   'centralized'], out.stdout


def test_checkpoint_cost_benchmark_runs():
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.checkpoint_cost',
       '--mib=1'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r'^\s+1\s+[\d.]+\s+[\d.]+\s+[\d.]+$', out.stdout, re.M), (
      out.stdout)


def test_checkpoint_corruption_experiment_refuses_every_changed_value(
    tmp_path):
  """Two flipped positions: nothing is restored as other numbers."""
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.checkpoint_corruption',
       f'--workdir={tmp_path}', '--every=1400'], cwd=ROOT,
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r'2 positions flipped', out.stdout), out.stdout
  assert re.search(r'other\s+0', out.stdout), out.stdout


def test_accelerator_check_script_runs_shrunk():
  """The GPU script, shrunk to one tiny cohort per model, on CPU."""
  out = subprocess.run(
      ['bash', 'experiments/benchmarks/accelerator_check.sh', '--shrink'],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHON=sys.executable, ACCEL_MODELS='mlp lora'))
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count('simulator / centralized throughput') == 2
  assert out.stdout.count('device peak memory') == 2


def test_fedavg_throughput_benchmark_times_compression():
  """Compressed rounds compile once and print their bytes and cost ratio
  beside the plain round (no timing is asserted)."""
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.fedavg_throughput',
       '--population=40', '--clients=8', '--rounds=2', '--warmup=1',
       '--methods=simulator,simulator_compress_drive,'
       'simulator_compress_topk'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  # the MLP's 784*200 + 200 + 200*200 + 200 + 200*62 + 62 = 209,662 floats
  # DRIVE: one bit each of the padded 262,144 and a 32-bit scale
  assert ('simulator_compress_drive compilations for the whole run: 1; '
          'upload bytes per client 32,772 against the plain float32 '
          'message 838,648') in out.stdout, out.stdout
  # top-1%: 2,097 values of 32 bits and 18-bit indices
  assert 'simulator_compress_topk compilations for the whole run: 1; ' \
      'upload bytes per client 13,106' in out.stdout, out.stdout
  for name in ('drive', 'topk'):
    assert f'simulator / simulator_compress_{name} throughput' in out.stdout


def test_fedavg_throughput_benchmark_times_devices_and_fedbuff():
  """The round with the device model's timeline (always online, wait for
  all: the simulator's cohorts) and FedBuff's steps (each client from its
  own version) run beside the plain one in one process, compile once and
  print their cost ratios (no timing is asserted)."""
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.fedavg_throughput',
       '--population=40', '--clients=8', '--rounds=2', '--warmup=1',
       '--methods=simulator,simulator_devices,simulator_fedbuff'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'simulator / simulator_devices throughput' in out.stdout, out.stdout
  assert 'simulator_fedbuff compilations for the whole run: 1' in out.stdout
  assert 'simulator / simulator_fedbuff throughput' in out.stdout, out.stdout


def test_secure_compression_benchmark_runs_tiny():
  """The error table of compression under secure aggregation prints a row
  per compressor and bits, the rotation's error the smaller."""
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.secure_compression',
       '--dim=1024', '--clients=4', '--bits=4', '--repeats=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {m[1]: float(m[2]) for m in re.finditer(
      r'^\| (qsgd|rotated_qsgd) \| 4 \| \d+ \| [\d,]+ \| ([\d.e+-]+) \|',
      out.stdout, re.M)}
  assert set(rows) == {'qsgd', 'rotated_qsgd'}, out.stdout
  assert rows['rotated_qsgd'] < rows['qsgd']

r"""Starts a multi-process run on this machine: N copies of a command, joined
by `fedjax_pfi.distributed` (JAX's multi-controller runtime; Gloo
collectives on CPU).

  python -m launch.local --num_processes=2 -- \
      python -m experiments.main --config=experiments/configs/synthetic_fedprox.py \
      --workdir=/tmp/fedjax_pfi/two_process --config.execution.devices=0

Each process gets ``FEDJAX_PFI_COORDINATOR`` (``localhost:<free port>``),
``FEDJAX_PFI_NUM_PROCESSES`` and ``FEDJAX_PFI_PROCESS_ID``, and
``--devices_per_process`` CPU devices (``XLA_FLAGS``) unless ``--platform``
is not ``cpu``. Output lines are prefixed with ``[i]``. If one process fails
the others are stopped, and the launcher exits with the first failure's
status.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from absl import app
from absl import flags

from fedjax_pfi import distributed

_NUM = flags.DEFINE_integer('num_processes', 2, 'Processes to start.')
_DEVICES = flags.DEFINE_integer('devices_per_process', 1,
                                'CPU devices each process sees.')
_PLATFORM = flags.DEFINE_string('platform', 'cpu',
                                'JAX_PLATFORMS for the processes.')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env(i: int, num: int, port: int, devices: int,
                platform: str) -> dict:
  env = dict(os.environ)
  env[distributed.ENV_COORDINATOR] = f'localhost:{port}'
  env[distributed.ENV_NUM_PROCESSES] = str(num)
  env[distributed.ENV_PROCESS_ID] = str(i)
  env['JAX_PLATFORMS'] = platform
  if platform == 'cpu':
    flags_ = [f for f in env.get('XLA_FLAGS', '').split()
              if not f.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join(
        flags_ + [f'--xla_force_host_platform_device_count={devices}'])
  return env


def launch(command: Sequence[str], num: int, devices: int = 1,
           platform: str = 'cpu') -> int:
  """Runs ``command`` as ``num`` processes; returns the exit status."""
  if num < 1:
    raise ValueError(f'--num_processes must be >= 1, got {num}.')
  if not command:
    raise ValueError('no command given; put it after "--".')
  port = free_port()
  procs = [subprocess.Popen(list(command), env=process_env(
      i, num, port, devices, platform), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(num)]

  def pump(i, p):
    for line in p.stdout:
      sys.stdout.write(f'[{i}] {line}')
      sys.stdout.flush()

  threads = [threading.Thread(target=pump, args=(i, p), daemon=True)
             for i, p in enumerate(procs)]
  for t in threads:
    t.start()
  status = 0
  while any(p.poll() is None for p in procs):
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if failed and not status:
      status = failed[0]
      for p in procs:
        if p.poll() is None:
          p.terminate()
    time.sleep(0.2)
  for t in threads:
    t.join(timeout=5)
  return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv):
  sys.exit(launch(argv[1:], _NUM.value, _DEVICES.value, _PLATFORM.value))


if __name__ == '__main__':
  app.run(main)

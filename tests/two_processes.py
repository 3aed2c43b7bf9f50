"""Runs a test module as two JAX processes on 127.0.0.1 and collects what each saved.

The module is started as ``python -m MODULE ADDRESS PROCESS_ID OUT`` twice, with 2 CPU
devices per process (4 in all) and float64 on; each process calls :func:`join` and saves
its arrays with ``numpy.savez(OUT, ...)``.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(module: str, timeout_s: int) -> list[dict[str, np.ndarray]]:
  """The arrays each of the two processes saved; fails the test if either fails or hangs."""
  address = f"127.0.0.1:{free_port()}"
  env = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "JAX_PLATFORMS": "cpu",
    "JAX_ENABLE_X64": "1",
    # Replaces the 8 devices of the test process's XLA_FLAGS: 2 per process, 4 in all.
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
  }
  with tempfile.TemporaryDirectory() as tmp:
    outs = [pathlib.Path(tmp, f"process{i}.npz") for i in range(2)]
    procs = [
      subprocess.Popen(
        [sys.executable, "-m", module, address, str(i), str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
      for i, out in enumerate(outs)
    ]
    try:
      logs = [proc.communicate(timeout=timeout_s)[0] for proc in procs]
    except subprocess.TimeoutExpired:
      for proc in procs:
        proc.kill()
      pytest.fail(f"the two processes did not finish within {timeout_s} s")
    for proc, log in zip(procs, logs, strict=True):
      assert proc.returncode == 0, log
    return [dict(np.load(out)) for out in outs]


def join(address: str, process_id: int) -> tuple[Mesh, Callable[[tuple], tuple]]:
  """In one of the two processes: joins the run, and returns the 4-device data mesh and a
  function that turns a global batch into global arrays built from this process's half."""
  jax.distributed.initialize(address, num_processes=2, process_id=process_id)
  assert jax.config.jax_enable_x64
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
  mesh = jax.make_mesh((4,), ("data",))
  split = NamedSharding(mesh, P("data"))

  def local_rows(batch: tuple) -> tuple:
    # Each process loads only its half of the global batch.
    half = batch[0].shape[0] // 2
    rows = slice(process_id * half, (process_id + 1) * half)
    return tuple(jax.make_array_from_process_local_data(split, a[rows]) for a in batch)

  return mesh, local_rows

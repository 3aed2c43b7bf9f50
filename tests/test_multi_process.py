"""Two processes (2 CPU devices each, ``jax.distributed`` on 127.0.0.1) train like one.

Each process feeds its half of every batch; data-parallel F-SAM under ``jit``
and under ``shard_map`` must give, in both processes, the params, optimizer
state and losses of one process running the whole batch, within 1e-9.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from tests.test_layouts import single_device

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one():
  address = f"127.0.0.1:{free_port()}"
  env = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "JAX_PLATFORMS": "cpu",
    "JAX_ENABLE_X64": "1",
    # Replaces the 8 devices of this process's XLA_FLAGS: 2 per process, 4 in all.
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
  }
  with tempfile.TemporaryDirectory() as tmp:
    outs = [pathlib.Path(tmp, f"process{i}.npz") for i in range(2)]
    procs = [
      subprocess.Popen(
        [sys.executable, "-m", "tests.multi_process_worker", address, str(i), str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
      for i, out in enumerate(outs)
    ]
    logs = []
    try:
      for proc in procs:
        logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
      for proc in procs:
        proc.kill()
      pytest.fail(f"the two processes did not finish within {TIMEOUT_S} s")
    for proc, log in zip(procs, logs, strict=True):
      assert proc.returncode == 0, log
    results = [dict(np.load(out)) for out in outs]
  with jax.enable_x64(True):
    want = single_device()
  want_leaves = jax.tree.leaves((want.params, want.opt_state, list(want.losses)))
  for result in results:
    for layout in ("jit", "shard_map"):
      got = [result[f"{layout}_{i}"] for i in range(len(want_leaves))]
      assert len(result) == 2 * len(want_leaves)
      for g, w in zip(got, want_leaves, strict=True):
        np.testing.assert_allclose(g, np.asarray(w), rtol=0, atol=1e-9)

"""ResNet-18 on CIFAR-10/100 with SGD, SAM or F-SAM: the paper's setting.

The official F-SAM recipe (the authors' CIFAR settings): ResNet-18 (CIFAR variant:
3x3 stem, no max-pool), 200 epochs, batch 128, SGD with lr 0.05, momentum 0.9
and weight decay 1e-3, cosine decay to 0 stepped every iteration, random crop
+ flip + Cutout (16 px, p = 0.5), rho 0.2, sigma 1, lambda 0.6.

* Data-parallel over every local device: the batch is sharded along a
  ``data`` mesh axis with ``NamedSharding`` and the state is replicated. Under
  ``jit`` the gradient is that of the global batch, so the perturbation is the
  single-device algorithm's ("global").
* BatchNorm statistics come from the clean pass (the helper's aux).
* Orbax checkpoints every epoch in ``--workdir``; running the same command
  again resumes from the latest one.
* One log line per epoch (also appended to ``log.jsonl``) and a final
  ``results.json``.

Data: ``--data-dir`` is the standard python-pickle folder
(``cifar-10-batches-py`` or ``cifar-100-python``, or a folder holding it);
``--tfds`` reads through ``tensorflow_datasets`` instead. ``--smoke`` writes a
tiny generated data set in the same pickle format and runs a few steps of a
narrow ResNet-18.

Usage::

  python examples/cifar.py --dataset cifar100 --data-dir ~/data --method fsam
  python examples/cifar.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import pickle
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from resnet import ResNet18  # examples/resnet.py, beside this script

import fsam_optax

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
URLS = {
  "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
  "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


@dataclasses.dataclass(frozen=True)
class Config:
  """Training settings; the defaults are the official CIFAR recipe."""

  dataset: str = "cifar100"
  data_dir: str | None = None
  tfds: bool = False
  method: str = "fsam"
  epochs: int = 200
  batch_size: int = 128
  lr: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 1e-3
  rho: float = 0.2
  sigma: float = 1.0
  lmbda: float = 0.6
  cutout: int = 16
  width: int = 64
  seed: int = 0
  eval_batch_size: int = 1000
  workdir: str = "runs/cifar"
  smoke: bool = False


@dataclasses.dataclass(frozen=True)
class Dataset:
  """uint8 images (N, 32, 32, 3) and int32 labels."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


class DataNotFoundError(FileNotFoundError):
  """The CIFAR pickle folder is missing; the message says how to get it."""


def _missing(dataset: str, where: pathlib.Path | None) -> DataNotFoundError:
  folder, url = FOLDERS[dataset], URLS[dataset]
  place = f"no {folder} at {where}" if where else "no --data-dir given"
  return DataNotFoundError(
    f"{dataset}: {place}. Download and unpack the python version:\n"
    f"  curl -LO {url} && tar xzf {url.rsplit('/', 1)[1]}\n"
    f"then pass --data-dir ./{folder} (or the folder that holds it); or "
    f"`pip install tensorflow-datasets tensorflow` and pass --tfds; or try "
    f"the script with --smoke on generated data."
  )


def find_pickle_dir(data_dir: str | pathlib.Path | None, dataset: str) -> pathlib.Path:
  """The pickle folder itself: ``data_dir`` or its ``cifar-*`` child."""
  if data_dir is None:
    raise _missing(dataset, None)
  base = pathlib.Path(data_dir).expanduser()
  marker = "test_batch" if dataset == "cifar10" else "test"
  for folder in (base, base / FOLDERS[dataset]):
    if (folder / marker).is_file():
      return folder
  raise _missing(dataset, base)


def _unpickle(path: pathlib.Path) -> dict[bytes, Any]:
  with open(path, "rb") as f:
    return pickle.load(f, encoding="bytes")


def _images(batch: dict[bytes, Any]) -> np.ndarray:
  # Rows are 3072 bytes: the red plane, then green, then blue, each row-major.
  return np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def load_pickles(data_dir: str | pathlib.Path | None, dataset: str) -> Dataset:
  """Reads the standard CIFAR-10/100 python-pickle folder."""
  folder = find_pickle_dir(data_dir, dataset)
  if dataset == "cifar10":
    train = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
    test, key = _unpickle(folder / "test_batch"), b"labels"
    classes = len(_unpickle(folder / "batches.meta")[b"label_names"])
  else:
    train = [_unpickle(folder / "train")]
    test, key = _unpickle(folder / "test"), b"fine_labels"
    classes = len(_unpickle(folder / "meta")[b"fine_label_names"])
  return Dataset(
    x_train=np.concatenate([_images(b) for b in train]),
    y_train=np.concatenate([np.asarray(b[key], np.int32) for b in train]),
    x_test=_images(test),
    y_test=np.asarray(test[key], np.int32),
    num_classes=classes,
  )


def load_tfds(dataset: str) -> Dataset:
  """Reads CIFAR through ``tensorflow_datasets`` (downloads on first use)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as err:
    raise ImportError("--tfds needs `pip install tensorflow-datasets tensorflow`.") from err
  train, test = (
    tfds.as_numpy(tfds.load(dataset, split=s, batch_size=-1)) for s in ("train", "test")
  )
  return Dataset(
    train["image"],
    train["label"].astype(np.int32),
    test["image"],
    test["label"].astype(np.int32),
    num_classes=10 if dataset == "cifar10" else 100,
  )


def write_fake_pickles(
  root: str | pathlib.Path, dataset: str, n_train: int, n_test: int, seed: int = 0
) -> pathlib.Path:
  """Writes random images in the exact CIFAR pickle layout; returns the folder."""
  rng = np.random.default_rng(seed)
  folder = pathlib.Path(root) / FOLDERS[dataset]
  folder.mkdir(parents=True, exist_ok=True)
  classes = 10 if dataset == "cifar10" else 100

  def batch(n: int, name: str) -> dict[bytes, Any]:
    labels = rng.integers(0, classes, n).tolist()
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    if dataset == "cifar10":
      return {
        b"batch_label": name.encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"{i}.png".encode() for i in range(n)],
      }
    return {
      b"filenames": [f"{i}.png".encode() for i in range(n)],
      b"batch_label": name.encode(),
      b"fine_labels": labels,
      b"coarse_labels": [y // 5 for y in labels],
      b"data": data,
    }

  def dump(obj: Any, name: str) -> None:
    with open(folder / name, "wb") as f:
      pickle.dump(obj, f)

  names = [f"class_{i}".encode() for i in range(classes)]
  if dataset == "cifar10":
    sizes = np.diff(np.linspace(0, n_train, 6).astype(int))
    for i, n in enumerate(sizes, start=1):
      dump(batch(int(n), f"training batch {i} of 5"), f"data_batch_{i}")
    dump(batch(n_test, "testing batch 1 of 1"), "test_batch")
    dump(
      {b"label_names": names, b"num_cases_per_batch": int(sizes[0]), b"num_vis": 3072},
      "batches.meta",
    )
  else:
    dump(batch(n_train, "training"), "train")
    dump(batch(n_test, "testing"), "test")
    dump({b"fine_label_names": names, b"coarse_label_names": names[:20]}, "meta")
  return folder


def augment(key: jax.Array, images: jax.Array, cutout: int) -> jax.Array:
  """Random crop (4 px zero padding), horizontal flip, Cutout with p = 0.5."""

  def one(key: jax.Array, image: jax.Array) -> jax.Array:
    crop, flip, cut, where = jax.random.split(key, 4)
    padded = jnp.pad(image, ((4, 4), (4, 4), (0, 0)))
    dy, dx = jax.random.randint(crop, (2,), 0, 9)
    image = jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)
    image = jnp.where(jax.random.bernoulli(flip), image[:, ::-1], image)
    cy, cx = jax.random.randint(where, (2,), 0, 32)
    # A cutout x cutout square centred at (cy, cx), clipped at the border.
    inside = lambda i, c: (i >= c - cutout // 2) & (i < c - cutout // 2 + cutout)
    hole = inside(jnp.arange(32)[:, None], cy) & inside(jnp.arange(32)[None, :], cx)
    hole = hole & jax.random.bernoulli(cut)
    return jnp.where(hole[..., None], 0.0, image)

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def normalize(images: jax.Array) -> jax.Array:
  return (images.astype(jnp.float32) / 255.0 - MEAN.reshape(1, 1, 1, 3)) / STD.reshape(1, 1, 1, 3)


def make_optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
  """SGD with momentum, coupled weight decay and per-step cosine decay, behind SAM or F-SAM."""
  base = optax.chain(
    optax.add_decayed_weights(cfg.weight_decay),
    optax.sgd(optax.cosine_decay_schedule(cfg.lr, total_steps), momentum=cfg.momentum),
  )
  if cfg.method == "sgd":
    return base
  if cfg.method == "sam":
    return optax.chain(fsam_optax.sam(cfg.rho), base)
  if cfg.method == "fsam":
    return optax.chain(fsam_optax.fsam(cfg.rho, sigma=cfg.sigma, lmbda=cfg.lmbda), base)
  raise ValueError(f"unknown method {cfg.method!r}; expected sgd, sam or fsam")


class Trainer:
  """The model, optimizer and compiled steps, sharded over a ``data`` mesh."""

  def __init__(self, cfg: Config, num_classes: int, steps_per_epoch: int):
    self.cfg = cfg
    devices = jax.local_devices()
    if cfg.batch_size % len(devices) or cfg.eval_batch_size % len(devices):
      raise ValueError(
        f"--batch-size {cfg.batch_size} and --eval-batch-size {cfg.eval_batch_size} must be "
        f"multiples of the {len(devices)} local devices."
      )
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    self.batch_sharding = NamedSharding(mesh, P("data"))
    self.replicated = NamedSharding(mesh, P())
    model = ResNet18(num_classes, cfg.width, rngs=nnx.Rngs(cfg.seed))
    self.graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    self.tx = make_optimizer(cfg, cfg.epochs * steps_per_epoch)
    state = {"params": params, "stats": stats, "opt_state": self.tx.init(params)}
    self.initial_state = jax.device_put(state, self.replicated)
    self.train_step = jax.jit(self._train_step, donate_argnums=0)
    self.eval_step = jax.jit(self._eval_step)

  def _loss(self, model: ResNet18, images: jax.Array, labels: jax.Array):
    logits = model(images, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

  def _train_step(
    self, state: dict[str, Any], images: jax.Array, labels: jax.Array, key: jax.Array
  ):
    images = augment(key, normalize(images), self.cfg.cutout)
    model = nnx.merge(self.graphdef, state["params"], state["stats"])
    if self.cfg.method == "sgd":
      (loss, accuracy), grads = nnx.value_and_grad(self._loss, has_aux=True)(model, images, labels)
    else:
      # The model keeps the BatchNorm statistics of the clean pass; the aux is the clean pass's.
      grad_fn = fsam_optax.sam_value_and_grad(self._loss, has_aux=True)
      (loss, accuracy), grads = grad_fn(model, state["opt_state"], images, labels)
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    updates, opt_state = self.tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    return {"params": params, "stats": stats, "opt_state": opt_state}, {
      "loss": loss,
      "accuracy": accuracy,
    }

  def _eval_step(
    self, state: dict[str, Any], images: jax.Array, labels: jax.Array, weight: jax.Array
  ):
    model = nnx.merge(self.graphdef, state["params"], state["stats"], copy=True)
    correct = jnp.argmax(model(normalize(images), train=False), -1) == labels
    return jnp.sum(correct * weight)

  def shard(self, *arrays: np.ndarray) -> list[jax.Array]:
    return [jax.device_put(a, self.batch_sharding) for a in arrays]

  def evaluate(self, state: dict[str, Any], data: Dataset) -> float:
    """Test accuracy; the last batch is padded and the padding weighted out."""
    size, correct = self.cfg.eval_batch_size, 0.0
    for start in range(0, len(data.y_test), size):
      x, y = data.x_test[start : start + size], data.y_test[start : start + size]
      pad = size - len(y)
      weight = np.pad(np.ones(len(y), np.float32), (0, pad))
      x, y = np.pad(x, ((0, pad), (0, 0), (0, 0), (0, 0))), np.pad(y, (0, pad))
      correct += float(self.eval_step(state, *self.shard(x, y, weight)))
    return correct / len(data.y_test)


class Checkpoints:
  """Orbax checkpoints of the train state and the history, one per epoch."""

  def __init__(self, directory: pathlib.Path):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True, enable_async_checkpointing=False
    )
    self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

  def save(self, epoch: int, state: dict[str, Any], history: list[dict[str, Any]]) -> None:
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)
    )
    self.manager.save(epoch, args=args)

  def restore(
    self, like: dict[str, Any]
  ) -> tuple[int, dict[str, Any], list[dict[str, Any]]] | None:
    """The latest (epoch, state, history), placed like ``like``; None when there is none."""
    epoch = self.manager.latest_step()
    if epoch is None:
      return None
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
    )
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()
    )
    restored = self.manager.restore(epoch, args=args)
    return epoch, restored["state"], list(restored["history"])

  def close(self) -> None:
    self.manager.close()


def load_data(cfg: Config) -> Dataset:
  if cfg.smoke:
    folder = write_fake_pickles(
      pathlib.Path(cfg.workdir) / "smoke_data", cfg.dataset, n_train=64, n_test=40
    )
    return load_pickles(folder, cfg.dataset)
  return load_tfds(cfg.dataset) if cfg.tfds else load_pickles(cfg.data_dir, cfg.dataset)


def train(cfg: Config) -> dict[str, Any]:
  """Trains (resuming from ``cfg.workdir`` when it has a checkpoint); returns the results."""
  data = load_data(cfg)
  steps_per_epoch = len(data.y_train) // cfg.batch_size
  trainer = Trainer(cfg, data.num_classes, steps_per_epoch)
  workdir = pathlib.Path(cfg.workdir)
  checkpoints = Checkpoints(workdir / "checkpoints")
  state, history, start = trainer.initial_state, [], 0
  if (found := checkpoints.restore(trainer.initial_state)) is not None:
    start, state, history = found
    print(f"resumed from {workdir / 'checkpoints'} after epoch {start}")
  print(
    f"{cfg.method} on {cfg.dataset}: {len(data.y_train)} train / {len(data.y_test)} test images, "
    f"{jax.local_device_count()} {jax.default_backend()} device(s), {steps_per_epoch} steps/epoch"
  )
  key = jax.random.key(cfg.seed)
  for epoch in range(start + 1, cfg.epochs + 1):
    began = time.perf_counter()
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(data.y_train))
    metrics = []
    for step in range(steps_per_epoch):
      idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
      step_key = jax.random.fold_in(key, (epoch - 1) * steps_per_epoch + step)
      state, m = trainer.train_step(
        state, *trainer.shard(data.x_train[idx], data.y_train[idx]), step_key
      )
      metrics.append(m)
    metrics = jax.device_get(metrics)
    record = {
      "epoch": epoch,
      "train_loss": float(np.mean([m["loss"] for m in metrics])),
      "train_acc": float(np.mean([m["accuracy"] for m in metrics])),
      "test_acc": trainer.evaluate(state, data),
      "seconds": time.perf_counter() - began,
    }
    history.append(record)
    checkpoints.save(epoch, state, history)
    print(
      " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
      flush=True,
    )
    with open(workdir / "log.jsonl", "a") as f:
      f.write(json.dumps(record) + "\n")
  checkpoints.close()
  results = {
    "config": dataclasses.asdict(cfg),
    "devices": [str(d) for d in jax.local_devices()],
    "final_test_acc": history[-1]["test_acc"] if history else None,
    "best_test_acc": max((h["test_acc"] for h in history), default=None),
    "history": history,
  }
  (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  print(f"wrote {workdir / 'results.json'}")
  return results


SMOKE = dict(epochs=2, batch_size=16, eval_batch_size=16, width=8, workdir="runs/cifar_smoke")


HELP = {
  "dataset": "cifar10 or cifar100",
  "data_dir": "the python-pickle folder (cifar-10-batches-py or cifar-100-python) or a folder "
  "holding it; not needed with --tfds or --smoke",
  "tfds": "read the data through tensorflow_datasets instead of --data-dir",
  "method": "sgd, sam or fsam in front of the base optimizer",
  "epochs": "training epochs",
  "batch_size": "global minibatch size, split over the local devices",
  "lr": "peak learning rate of the cosine schedule, which decays to 0 step by step",
  "momentum": "momentum of the SGD base optimizer",
  "weight_decay": "weight decay of the base optimizer",
  "rho": "radius of the SAM and F-SAM perturbation",
  "sigma": "F-SAM's sigma: how much of the moving average of gradients to remove",
  "lmbda": "F-SAM's lmbda: the decay of that moving average",
  "cutout": "side in pixels of the Cutout square, applied with probability 0.5",
  "width": "channels of the first ResNet-18 stage",
  "seed": "seed of the initialisation, the augmentation and the minibatch order",
  "eval_batch_size": "batch size of the test-set evaluation",
  "workdir": "folder for the checkpoints, log.jsonl and results.json; the same command again "
  "resumes from its latest checkpoint",
  "smoke": "a few steps of a narrow ResNet-18 on a tiny generated data set ("
  + ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in SMOKE.items())
  + "); flags given explicitly still win",
}


def make_parser() -> argparse.ArgumentParser:
  """The command line: one flag per setting of :class:`Config`."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for field in dataclasses.fields(Config):
    flag = "--" + field.name.replace("_", "-")
    if field.type == "bool":
      parser.add_argument(flag, action="store_true", help=HELP[field.name])
    elif field.name == "data_dir":
      parser.add_argument(flag, default=None, help=HELP[field.name])
    else:
      help_text = f"{HELP[field.name]} (default {field.default})"
      parser.add_argument(flag, type=type(field.default), default=None, help=help_text)
  return parser


def parse_args(argv: Sequence[str] | None = None) -> Config:
  args = {k: v for k, v in vars(make_parser().parse_args(argv)).items() if v not in (None, False)}
  # --smoke shrinks the run; flags given explicitly still win.
  return Config(**({**SMOKE, **args} if args.get("smoke") else args))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return train(parse_args(argv))


if __name__ == "__main__":
  main()

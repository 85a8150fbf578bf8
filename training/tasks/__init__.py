"""The task seam: the framework decides *which* sample ids a step uses, a task decides *what* a
sample is.

A task is a class with the methods of :class:`Task`. On every worker the framework calls
``load`` -> ``build_model(info)`` (under the framework's seed) -> per step ``batch`` (pure in ids
and seed; ``training=False`` in evaluation) -> ``step`` (loss for backward + additive totals) ->
``metrics(totals, info)`` (totals summed over all ranks and steps of a log interval). What
``load`` learns about the data (the number of classes, a feature count) is the ``info`` of the
:class:`Loaded` it returns, passed to ``build_model`` and ``metrics`` as an argument: no method
reads what another one left on ``self``. On the driver, before Ray starts, ``check`` reads
metadata only and returns the data fingerprint that becomes part of the run's identity.

Built-in tasks are named (``tabular``, ``language_model``, ``image``); a user's task is
``package.module:ClassName``, importable on the driver and on every worker.
"""

from __future__ import annotations

import importlib
import inspect
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import pyarrow.fs as pafs
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from training.core.data import ShardLayout

BUILTIN_TASKS = {
    "tabular": "training.tasks.tabular:TabularClassification",
    "language_model": "training.tasks.language_model:CausalLanguageModel",
    "image": "training.tasks.image:ImageClassification",
}


class TaskError(ValueError):
    """Bad task options or data; the message is one line naming what is wrong and what is
    allowed. Raised on the driver, before any Ray resource is taken."""


class Options(BaseModel):
    """Base for a task's options (``task.options`` in the YAML): unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class DataSource:
    """Where the task's data lives, resolved by the framework (local path or object store)."""

    fs: pafs.FileSystem
    path: str  # filesystem path (no scheme)
    uri: str  # as the user wrote it, made absolute: for messages
    val_fraction: float


def data_source(cfg: Any) -> DataSource:
    """The task's data (``cfg.data`` on ``cfg.storage``), resolved the same way on the driver,
    the workers, the CLI and the torchrun baseline."""
    from training.core import storage

    fs, path = storage.resolve(cfg.data.path, cfg.storage)
    return DataSource(fs, path, storage.absolute(cfg.data.path), cfg.data.val_fraction)


@dataclass
class StepOutput:
    """``loss``: the mean over this micro-batch, for backward. ``totals``: additive sums (e.g.
    ``loss`` summed over samples, ``count``), detached; the framework adds them over micro-batches,
    steps and ranks, so metrics are normalised by the global count at any world size."""

    loss: torch.Tensor
    totals: dict[str, torch.Tensor]


Info = TypeVar("Info")


@dataclass(frozen=True)
class Loaded(Generic[Info]):
    """What ``Task.load`` returns. ``train`` and ``val``: anything with ``len()`` that ``batch``
    can index by integer id. ``info``: what loading learned about the data that the model or the
    metrics depend on (the number of classes, a feature count, a vocabulary size): a frozen
    dataclass, a NamedTuple, a number, a string or None. The framework passes it to
    ``build_model`` and ``metrics``; immutable, so neither can change what the other sees."""

    train: Any
    val: Any
    info: Info = None  # type: ignore[assignment]  # None: nothing learned


class Task(Generic[Info]):
    """Base class with the defaults; override what your workload needs (see README). ``Info`` is
    the type of ``Loaded.info``: write ``class MyTask(Task[MyInfo])`` for a type checker."""

    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options, data: DataSource):
        self.options = options
        self.data = data

    # ---- driver side, before Ray starts -------------------------------------------------
    def check(self) -> dict[str, Any]:
        """Validate the data from metadata; return the fingerprint (must hold ``train_samples``)."""
        raise NotImplementedError

    def write_demo(self) -> None:
        """Write this task's demo dataset at ``self.data``; optional."""
        raise TaskError(f"task {type(self).__name__} has no demo dataset; point data.path at data")

    # ---- every worker -------------------------------------------------------------------
    def load(self) -> Loaded[Info]:
        """``Loaded(train, val, info)``: the two splits and what loading learned (see Loaded)."""
        raise NotImplementedError

    def build_model(self, info: Info) -> nn.Module:
        """The model for data described by ``info`` (``Loaded.info``)."""
        raise NotImplementedError

    def shard_layout(self, train: Any) -> ShardLayout | None:
        """For data read shard by shard (streamed): how the ids of ``train`` (``Loaded.train``)
        sit in storage, so the framework's order keeps each step within a window of shards.
        None: ids are random access and the order is a plain shuffle."""
        del train
        return None

    def prefetch(self, samples: Any, upcoming: Iterator[torch.Tensor]) -> None:
        """Told once per attempt which ids this worker's coming steps use (one tensor per step,
        in order), so a streaming task can read ahead in the background. Optional."""
        del samples, upcoming

    def batch(self, samples: Any, ids: torch.Tensor, seed: int, *, training: bool) -> Any:
        """The batch for sample ``ids``; any randomness (augmentation) only from (seed, id).
        ``training`` is False in evaluation: no augmentation then (``seed`` is still an int,
        the same at every evaluation of a run)."""
        raise NotImplementedError

    def step(self, model: nn.Module, batch: Any) -> StepOutput:
        raise NotImplementedError

    def metrics(self, totals: dict[str, float], info: Info) -> dict[str, float]:
        """Reported metrics from summed totals (and ``Loaded.info``); must include ``loss``."""
        del info
        return {"loss": totals["loss"] / totals["count"]}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups of ``model`` (the bare model, on its device), for example
        no weight decay on biases and norms: ``[{"params": [...], "weight_decay": 0.0}, ...]``;
        every parameter in exactly one group. None: one group, ``training.optimizer`` as set."""
        del model
        return None

    def shard_units(self, model: nn.Module) -> list[nn.Module] | None:
        """Under ``training.parallelism: fsdp``: the submodules of ``model`` sharded as units
        (their parameters gathered for their forward and freed after), typically the transformer
        blocks. None: the framework's rule (the entries of the model's ``nn.ModuleList`` s, else
        its children with parameters)."""
        del model
        return None

    def state_dict(self) -> dict[str, Any]:
        """Extra state saved in every checkpoint (EMA weights, a tokenizer's state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class ClassificationTask(Task[Info]):
    """A task whose batch is ``(inputs, integer labels)`` and whose model returns class logits:
    cross-entropy, with loss, hits and count as totals; reports loss and accuracy."""

    def step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> StepOutput:
        inputs, labels = batch
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits, labels)
        totals = {
            "loss": loss.detach().float() * len(labels),
            "correct": (logits.detach().argmax(dim=1) == labels).sum().float(),
            "count": torch.tensor(float(len(labels)), device=labels.device),
        }
        return StepOutput(loss, totals)

    def metrics(self, totals: dict[str, float], info: Info) -> dict[str, float]:
        del info
        return {
            "loss": totals["loss"] / totals["count"],
            "accuracy": totals["correct"] / totals["count"],
        }


def check_heads_divide_width(d_model: int, n_heads: int) -> None:
    """For options of attention models (a pydantic validator turns this into one line)."""
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")


def task_class(name: str) -> type[Task]:
    """The class behind ``task.name``; TaskError if it cannot be imported or is not a Task."""
    target = BUILTIN_TASKS.get(name, name)
    if ":" not in target:
        raise TaskError(
            f"task.name '{name}': use one of {', '.join(BUILTIN_TASKS)} "
            "or an import string 'package.module:ClassName'"
        )
    cls = import_object(target, "task.name")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"task.name '{name}': {cls!r} is not a subclass of training.tasks.Task")
    check_interface(cls, f"task.name '{name}'")
    return cls


# The task interface changed on 2026-12-03 (CHANGELOG): per method, arguments that the new
# signature accepts and the old one does not, and the new signature in words.
NEW_SIGNATURES = {
    "build_model": (((None,), {}), "build_model(self, info)"),
    "metrics": ((({}, None), {}), "metrics(self, totals, info)"),
    "batch": (
        ((None, None, 0), {"training": True}),
        "batch(self, samples, ids, seed, *, training)",
    ),
    "shard_layout": (((None,), {}), "shard_layout(self, train)"),
}


def check_interface(cls: type[Task], where: str) -> None:
    """TaskError naming every method of ``cls`` whose signature the framework cannot call: a
    task written for the interface before 2026-12-03 fails here, on the driver, not in a
    worker with a TypeError."""
    changed = []
    for method, ((args, kwargs), wanted) in NEW_SIGNATURES.items():
        function = getattr(cls, method)
        try:
            inspect.signature(function).bind(None, *args, **kwargs)
        except TypeError:
            changed.append(f"{method}{inspect.signature(function)} must be {wanted}")
    if changed:
        raise TaskError(
            f"{where}: {cls.__name__} is written for the task interface before 2026-12-03: "
            f"{'; '.join(changed)}. Now load() returns Loaded(train, val, info), the framework "
            "passes info (what load learned, e.g. the number of classes) to build_model and "
            "metrics, and evaluation calls batch with training=False instead of seed=None "
            "(docs/tasks.md#your-own-task)"
        )


def load(task: Task[Info]) -> Loaded[Info]:
    """``task.load()``, checked: TaskError naming what it returned when that is not a Loaded
    whose info is immutable (build_model and metrics share it)."""
    loaded = task.load()
    name = type(task).__name__
    if not isinstance(loaded, Loaded):
        raise TaskError(
            f"{name}.load() returned {type(loaded).__name__}, not Loaded(train, val, info): a "
            "(train, val) tuple is the task interface before 2026-12-03 (docs/tasks.md)"
        )
    info = loaded.info
    params = getattr(type(info), "__dataclass_params__", None)  # set by @dataclass
    frozen = params is not None and params.frozen
    if not (frozen or info is None or isinstance(info, (tuple, int, float, str))):
        raise TaskError(
            f"{name}.load() returned Loaded.info of type {type(info).__name__}, which can be "
            "changed; use a frozen dataclass (@dataclass(frozen=True)), a NamedTuple, a number, "
            "a string or None"
        )
    return loaded


def import_object(target: str, field: str) -> Any:
    """The object behind ``package.module:name`` (the one resolver of user import strings);
    TaskError naming ``field`` and what to check when the module or the name is missing."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):  # the module itself, not its imports
            raise TaskError(
                f"{field} '{target}': no module '{module_name}' where this runs (current "
                f"directory {os.getcwd()}): run from the directory that holds it, add that "
                "directory to PYTHONPATH, or ship it with the job (ray job submit "
                "--working-dir .)"
            ) from None
        raise TaskError(f"{field} '{target}': importing '{module_name}' failed: {exc}") from None
    except Exception as exc:  # a user's module that raises on import
        raise TaskError(f"{field} '{target}': importing '{module_name}' failed: {exc}") from None
    if not hasattr(module, attr):
        public = sorted(n for n, value in vars(module).items() if _defined_in(module, n, value))
        raise TaskError(
            f"{field} '{target}': module '{module_name}' has no '{attr}' "
            f"(it defines: {', '.join(public[:12]) or 'nothing public'})"
        )
    return getattr(module, attr)


def _defined_in(module: types.ModuleType, name: str, value: Any) -> bool:
    """A public name the module defines itself, not one it imported (what a user may mean)."""
    if name.startswith("_") or isinstance(value, types.ModuleType):
        return False
    return getattr(value, "__module__", module.__name__) == module.__name__


def parse_options(cls: type[Task], raw: dict[str, Any]) -> Options:
    """Validate ``task.options``; one line per problem, each naming the option."""
    try:
        return cls.Options.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(["task.options", *(str(p) for p in err["loc"])])
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(cls.Options.model_fields)) or "none"
                message = f"unknown option; allowed options: {allowed}"
            lines.append(f"{where}: {message}")
        raise TaskError("\n".join(lines)) from None


def build(name: str, raw_options: dict[str, Any], data: DataSource) -> Task:
    cls = task_class(name)
    return cls(parse_options(cls, raw_options), data)


def derive_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (e.g. (seed, sample id)) for per-sample randomness."""
    from training.core.data import derive_seed

    return torch.Generator().manual_seed(derive_seed(*parts))


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch

"""The one typed configuration: YAML file -> CLI overrides -> validated pydantic model.

Everything is validated here, before any Ray resource is requested. Workers receive the
resolved config as a plain dict (``Config.model_dump()``) and re-validate it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)


class ConfigError(ValueError):
    """Invalid configuration; ``str()`` is one line per problem, each naming the field."""


class Section(BaseModel):
    # A misspelt key must be an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = Field(
        "demo",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="Run name; with storage.path it identifies the run. Same pair again = resume.",
    )


class StorageSection(Section):
    path: str = Field(
        "./runs",
        min_length=1,
        description="Where runs live: a local/shared path (same on every node) or s3://bucket/prefix.",
    )
    endpoint_override: str | None = Field(
        None, description="S3-compatible endpoint, host:port (MinIO, SeaweedFS, Ceph)."
    )
    region: str | None = Field(None, description="S3 region.")
    scheme: Literal["http", "https"] = Field("https", description="Scheme for endpoint_override.")
    allow_bucket_creation: bool = Field(False, description="Create the S3 bucket if missing.")


class ScalingSection(Section):
    min_workers: PositiveInt = Field(2, description="Fewest training workers the run accepts.")
    max_workers: PositiveInt = Field(2, description="Most training workers the run will use.")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend; gloo on CPU.")
    cpus_per_worker: PositiveFloat = Field(1, description="CPUs reserved per worker.")
    resize_check_interval_s: PositiveFloat = Field(
        60, description="Seconds between checks for capacity to grow toward max_workers."
    )

    @model_validator(mode="after")
    def _min_not_above_max(self) -> ScalingSection:
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers ({self.min_workers}) must be <= max_workers ({self.max_workers})"
            )
        return self


class OptimizerSection(Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = Field(1e-3, description="Peak learning rate.")
    weight_decay: NonNegativeFloat = 0.0
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (sgd only).")


class LRScheduleSection(Section):
    name: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: NonNegativeInt = Field(0, description="Linear warm-up, in global steps.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Final LR as a share of peak.")


class TrainingSection(Section):
    epochs: PositiveInt = Field(1, description="Passes over the training rows.")
    max_steps: PositiveInt | None = Field(
        None, description="Stop after this many global steps (caps epochs)."
    )
    global_batch_size: PositiveInt = Field(
        64, description="Samples per global step, split evenly across the current workers."
    )
    seed: NonNegativeInt = Field(0, description="Seeds init, data order and in-step randomness.")
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    lr_schedule: LRScheduleSection = Field(default_factory=LRScheduleSection)
    grad_clip_norm: PositiveFloat | None = Field(1.0, description="Max global grad norm, or null.")
    micro_batch_size: PositiveInt | None = Field(
        None,
        description="Samples per forward/backward on a worker; the worker's share of the global "
        "batch is accumulated in micro-batches of this size (null: one pass). Bounds memory "
        "when a shrunk world gives each worker a larger share.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16/fp16: autocast; fp16 adds a GradScaler (checkpointed)."
    )
    deterministic: bool = Field(
        False, description="torch.use_deterministic_algorithms (slower kernels on GPU)."
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every worker holds the whole model (DDP), rank 0 writes one checkpoint "
        "file. fsdp: parameters, gradients and optimizer state sharded over the workers (FSDP2, "
        "the task's shard units), every worker writes its shards (Distributed Checkpoint), "
        "loadable at any world size, on any storage.path (local, shared or s3://); docs/fsdp.md.",
    )
    collective_timeout_s: PositiveFloat = Field(
        300, description="A peer silent this long in a collective fails the attempt (Ray: 30 min)."
    )
    log_every_n_steps: PositiveInt = Field(
        10, description="Metrics are reduced over the ranks and logged every N steps."
    )
    report_every_n_steps: PositiveInt | None = Field(
        None,
        description="Metrics-only ray.train.report every N steps; null: only with checkpoints. "
        "Each call is a cluster-wide barrier and Ray Train V2 keeps only the metrics reported "
        "with a checkpoint, so use it only if a tool of yours reads them.",
    )


class TaskSection(Section):
    name: str = Field(
        "tabular",
        description="tabular | language_model | image, or your own 'package.module:ClassName'.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="The task's own options, validated by the task."
    )


class DataSection(Section):
    path: str = Field(
        "./data/demo.parquet",
        min_length=1,
        description="The task's data (file or directory), local/shared path or s3://.",
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share held out for eval.")
    create_demo_if_missing: bool = Field(
        False, description="Write the task's demo dataset at path first if nothing is there."
    )


class EvalSection(Section):
    every_n_steps: PositiveInt | None = Field(
        None, description="Evaluate every N global steps; null: at every checkpoint."
    )
    batches: NonNegativeInt = Field(
        20, description="Held-out global batches per evaluation, sharded over the ranks; 0: off."
    )

    def due(self, global_step: int, checkpoint_due: bool) -> bool:
        """Whether to evaluate after ``global_step`` (the Ray loop and the torchrun baseline)."""
        if self.batches == 0:
            return False
        return (
            checkpoint_due if self.every_n_steps is None else global_step % self.every_n_steps == 0
        )


class CheckpointSection(Section):
    every_n_steps: PositiveInt = Field(50, description="Checkpoint every N global steps.")
    num_to_keep: PositiveInt = Field(3, description="Newest valid checkpoints kept on storage.")
    upload: Literal["sync", "async"] = Field(
        "async",
        description="async: training continues while the checkpoint uploads (measured: 1.98 s "
        "-> 0.05 s pause per 10 MB checkpoint; under fsdp DCP's asynchronous save, the pause "
        "is the staging copy of the shards); sync: report() returns after the upload.",
    )
    on_failure: bool | None = Field(
        None,
        description="When a peer dies or a collective fails, rank 0 saves the state it holds "
        "(the last completed step), so the retry redoes no step; if rank 0 itself died, the "
        "retry resumes from the newest periodic checkpoint. null: true under "
        "training.parallelism ddp, false under fsdp (where no rank holds the whole state, so it "
        "cannot be set true).",
    )


class FailureSection(Section):
    max_failures: int = Field(3, ge=-1, description="Worker-group restarts allowed; -1 = no limit.")
    health_check_interval_s: PositiveFloat = Field(
        0.2,
        description="How often Ray Train's controller polls the workers (Ray's default: 2). It "
        "bounds failure detection, how long every ray.train.report waits, and how many "
        "checkpoints Ray registers: one per poll, so checkpoints that come faster make training "
        "wait. An exported RAY_TRAIN_HEALTH_CHECK_INTERVAL_S takes precedence.",
    )
    group_start_timeout_s: PositiveFloat = Field(
        60,
        description="How long Ray Train waits for a new worker group to start before it counts "
        "the start as a failure and tries again (Ray's default: 60). After a node is lost, an "
        "elastic run may first ask for the old size (Ray's view of the reserved resources "
        "refreshes every ~20 s) and then waits out this timeout before it retries at the "
        "smaller size; lower it to recover sooner, keep it above how long a node or pod takes "
        "to start when the run must wait for one. An exported "
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S takes precedence.",
    )
    spare_workers: bool = Field(
        True,
        description="Keep one idle worker process per train worker on each node, with torch and "
        "the project already imported, so a restart does not wait for new processes and "
        "imports, and start the first group's processes from the driver while Ray Train "
        "starts (training/ray_internals/spares.py). Costs ~0.4 GB of RAM per spare.",
    )


class Fault(Section):
    kind: Literal["kill", "raise", "stall", "drop_sample", "repeat_sample"] = Field(
        description="kill: SIGKILL the worker; raise: an exception; stall: sleep `seconds`; "
        "drop_sample / repeat_sample (for testing the ledger check): the step feeds its task "
        "one id fewer / a second copy of one id on that rank, and `verify` must fail."
    )
    rank: NonNegativeInt = Field(0, description="World rank that fails.")
    step: PositiveInt = Field(description="Global step at which the fault fires.")
    during: Literal["step", "forward", "backward", "serialize", "checkpoint"] = Field(
        "step",
        description="step: before the step runs; forward: after the model's training forward "
        "pass (its buffers moved); backward: inside the backward pass, once the first "
        "parameter's gradient is accumulated; serialize: rank 0, in the background save, "
        "before the staged state is written; checkpoint: while the checkpoint is uploaded "
        "(rank 0: after the state file, before the manifest).",
    )
    seconds: PositiveFloat = Field(30, description="Stall length (stall only).")


class ChaosSection(Section):
    faults: list[Fault] = Field(
        default_factory=list, description="Each fault fires once per run, across restarts."
    )


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    task: TaskSection = Field(default_factory=TaskSection)
    data: DataSection = Field(default_factory=DataSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    failure: FailureSection = Field(default_factory=FailureSection)
    chaos: ChaosSection = Field(default_factory=ChaosSection)

    @model_validator(mode="after")
    def _batch_divides_every_world_size(self) -> Config:
        batch, scaling = self.training.global_batch_size, self.scaling
        bad = [w for w in range(scaling.min_workers, scaling.max_workers + 1) if batch % w]
        if bad:
            raise ValueError(
                f"training.global_batch_size ({batch}) must be divisible by every allowed "
                f"world size {scaling.min_workers}..{scaling.max_workers}; it is not by "
                f"{', '.join(map(str, bad))}"
            )
        return self

    @model_validator(mode="after")
    def _fsdp_supported(self) -> Config:
        if self.training.parallelism != "fsdp":
            if self.checkpoint.on_failure is None:
                self.checkpoint.on_failure = True
            return self
        if self.training.precision == "fp16":
            raise ValueError(
                "training.precision: fp16 is not supported with training.parallelism: fsdp "
                "(no sharded grad scaler); use bf16 or fp32"
            )
        if self.checkpoint.on_failure:
            raise ValueError(
                "checkpoint.on_failure: true is not possible with training.parallelism: fsdp: "
                "no rank holds the whole state, and a dead peer's shards die with it (the retry "
                "resumes from the newest periodic checkpoint; docs/fsdp.md); leave it unset"
            )
        self.checkpoint.on_failure = False
        return self

    @model_validator(mode="after")
    def _faults_target_existing_ranks(self) -> Config:
        for i, fault in enumerate(self.chaos.faults):
            if fault.during == "serialize" and fault.rank != 0:
                raise ValueError(f"chaos.faults[{i}]: during 'serialize' happens on rank 0 only")
            if fault.rank >= self.scaling.max_workers:
                raise ValueError(
                    f"chaos.faults[{i}].rank ({fault.rank}) must be < scaling.max_workers "
                    f"({self.scaling.max_workers})"
                )
        return self


# Fields that define what a run computes. Resuming with any of them changed is refused,
# because the resumed run could no longer equal an uninterrupted one.
IDENTITY_FIELDS = (
    "task",
    "data.path",
    "data.val_fraction",
    "training.precision",
    "training.seed",
    "training.global_batch_size",
    "training.epochs",
    "training.max_steps",
    "training.optimizer",
    "training.lr_schedule",
    "training.grad_clip_norm",
    # The checkpoint format differs: a run cannot read the other mode's checkpoints.
    "training.parallelism",
)
# What a run saved before the field existed meant.
IDENTITY_DEFAULTS = {"training.parallelism": "ddp"}


def identity_diff(
    saved: dict[str, Any], current: dict[str, Any], fields: tuple[str, ...] = IDENTITY_FIELDS
) -> list[str]:
    """Fields whose value differs between two dicts, as 'field: old -> new'."""
    diffs = []
    for dotted in fields:
        old, new = _lookup(saved, dotted), _lookup(current, dotted)
        if old is None:
            old = IDENTITY_DEFAULTS.get(dotted)
        if old != new:
            diffs.append(f"{dotted}: {old!r} -> {new!r}")
    return diffs


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        dotted, sep, value = item.partition("=")
        if not sep or not dotted.strip():
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. training.epochs=3")
        node = raw
        *parents, leaf = dotted.strip().split(".")
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{key}' is not a section")
            node = child
        node[leaf] = yaml.safe_load(value) if value.strip() else None
    return raw


def read_raw(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML file (optional) with the overrides applied, not yet validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    return apply_overrides(raw, list(overrides or []))


def validate_sections(raw: dict[str, Any]) -> Config:
    """Validate every section; the task's options are checked against the task's own model by
    ``training.driver.settings`` (the task registry may import user code)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(describe(err) for err in exc.errors())) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    return raw


def describe(err: dict[str, Any]) -> str:
    """One line per problem: the dotted field, what is wrong and what is allowed."""
    where = ".".join(str(p) for p in err["loc"])
    if not where and err["type"] == "value_error":  # a check across sections names its fields
        return err["msg"].removeprefix("Value error, ")
    where = where or "config"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(err["loc"][:-1])
        return f"{where}: unknown key; allowed keys here: {', '.join(allowed)}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{where}: required field is missing"
    if err["type"] == "value_error":  # our own validators already say what they saw
        return f"{where}: {message}"
    return f"{where}: {message} (got {err.get('input')!r})"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for key in loc:
        if isinstance(key, int):
            continue
        annotation = model.model_fields[str(key)].annotation
        model = _section_type(annotation) or model
    return sorted(model.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found:
            return found
    return None

"""The YAML run configuration: data sets, backbones, extraction, heads, index and schedule, validated by pydantic.

`python -m pipeline run CONFIG.yaml` runs it once; `python -m pipeline serve CONFIG.yaml` serves it on its cron
schedule. The models are also the Prefect flows' typed parameters, so Prefect validates them and renders a form.
A bad file is one error line naming each bad field and, where there is a fixed set, the valid choices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_type_hints

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from pipeline.config import (
    DEFAULT_RESAMPLES,
    DINOV2_KS,
    DINOV2_TEMPERATURE,
    MAX_RESAMPLES,
)
from pipeline.errors import ConfigError
from pipeline.evaluation.heads import HEADS
from pipeline.index.plan import INDEX_KINDS, parse_memory_size
from pipeline.plan import SPECS, spec_fields
from pipeline.sources.stream import is_stream

HeadName = Literal[tuple(HEADS)]  # the valid choices come from the registries, so they cannot drift
IndexKind = Literal[INDEX_KINDS]


class _Strict(BaseModel):
    # a misspelt key is an error, not silently ignored; NaN and infinity are never valid numbers here
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _SpecBacked(_Strict):
    """A config section whose fields are those of extraction specs (`pipeline.plan`): the same names, types,
    defaults and help, and the specs' own checks (a ConfigError is a ValueError, reported against the section)."""

    parts: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _checked_by_the_specs(self) -> _SpecBacked:
        values = self.model_dump()
        for part in self.parts:
            names = {f.name for f in spec_fields(part)}
            SPECS[part](**{k: v for k, v in values.items() if k in names})
        return self


def _spec_fields(part: str, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    hints = get_type_hints(SPECS[part])
    return {f.name: (hints[f.name], Field(f.default, description=f.metadata["help"] or None))
            for f in spec_fields(part) if f.name not in skip}


def _model(name: str, doc: str, parts: tuple[str, ...], fields: dict[str, Any]) -> type[_SpecBacked]:
    model = create_model(name, __base__=_SpecBacked, __module__=__name__, __doc__=doc, **fields)
    model.parts = parts
    return model


DatasetSpec = _model(
    "DatasetSpec", "One data set: anything `extract --data` accepts, with its listing options.", ("source",),
    {"name": (str, Field(pattern=r"^[A-Za-z0-9_.%-]+$", description="used in file and run names")),
     **_spec_fields("source"),
     "data": (str, Field(description="image folder, manifest, tar shards, or torchvision:NAME"))})

ExtractSpec = _model(
    "ExtractSpec", "How each backbone extracts: the extraction options that are not per backbone, and shards.",
    ("model", "decode", "layout", "run"),
    # --layer is per backbone, so --keep-spatial (which keeps that layer) is a command-line option only
    {**_spec_fields("model", skip=("backbone", "weights", "layer", "keep_spatial")), **_spec_fields("decode"),
     **_spec_fields("layout", skip=("spatial_dtype",)), **_spec_fields("run", skip=("overwrite", "progress")),
     "shards": (int, Field(1, ge=1, description="split each extraction over this many parallel Dask workers")),
     "dask_address": (str | None, Field(None, pattern=r"^(tcp|tls|ucx|inproc)://\S+$",
                                        description="run the parts on this existing Dask scheduler (e.g. "
                                                    "tcp://10.0.0.5:8786) instead of a local cluster"))})


def _size_or_none(text: str | None) -> str | None:
    if text is not None:
        parse_memory_size(text)  # a ConfigError is a ValueError: pydantic reports it against the field
    return text


MemorySize = Annotated[str | None, AfterValidator(_size_or_none)]


def _max_memory(beyond: str) -> Any:
    """The `max_memory` field of a section that reads a store: `beyond` says what it does past the budget."""
    return Field(None, description=f"feature data held at once, e.g. 4GiB (default: half the available memory); "
                                   f"beyond it {beyond}")


class ProbeSpec(_Strict):
    enabled: bool = True
    head: HeadName = "logreg"
    grid: list[float] | None = Field(None, description="the head's hyper-parameter values (default: its own grid)")
    resamples: int = Field(DEFAULT_RESAMPLES, ge=0, le=MAX_RESAMPLES,
                           description="bootstrap resamples for the 95% intervals (0: none)")
    val_seeds: list[int] = Field(default_factory=list,
                                 description="without a val split: the slice seeds whose spread is reported")
    max_memory: MemorySize = _max_memory("torch-logreg streams the store")

    @field_validator("grid")
    @classmethod
    def _positive(cls, grid: list[float] | None) -> list[float] | None:
        if grid is not None and (not grid or any(v <= 0 for v in grid)):
            raise ValueError("must be a non-empty list of positive numbers")
        return grid


class KnnSpec(_Strict):
    enabled: bool = True
    ks: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [k for k in DINOV2_KS if k <= 20],
                                                  min_length=1)
    temperature: float = Field(DINOV2_TEMPERATURE, gt=0)
    resamples: int = Field(DEFAULT_RESAMPLES, ge=0, le=MAX_RESAMPLES,
                           description="bootstrap resamples for the 95% intervals (0: none)")
    max_memory: MemorySize = _max_memory("the search streams the store")


class AuditSpec(_Strict):
    enabled: bool = True
    threshold: float | None = Field(None, gt=0, le=1, description="near duplicates: cosine at or above this "
                                                                  "(default: the store's auto threshold)")
    k: int = Field(10, ge=1, description="neighbours searched per row")
    max_memory: MemorySize = _max_memory("the audit streams the store")


class IndexSpec(_Strict):
    enabled: bool = True
    kind: IndexKind = "auto"
    memory_budget: str = Field("4GiB", description="e.g. 512MiB, 4GiB, 16GB")
    target_recall: float = Field(0.95, gt=0, le=1)

    @field_validator("memory_budget")
    @classmethod
    def _size(cls, text: str) -> str:
        parse_memory_size(text)  # a ConfigError is a ValueError: pydantic reports it against the field
        return text


class ScheduleSpec(_Strict):
    cron: str = Field(description="five-field cron, e.g. '0 2 * * *' for 02:00 every day")
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, text: str) -> str:
        from datetime import datetime

        from cronsim import CronSim, CronSimError

        try:
            CronSim(text, datetime(2026, 1, 1))
        except CronSimError as exc:
            raise ValueError(f"not a valid cron expression ({exc})") from None
        return text


class RunConfig(_Strict):
    """Everything one scheduled run does: extract each data set with each backbone (incrementally), probe, kNN,
    index, and publish a leaderboard per data set."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="names the deployment and the runs")
    output_dir: str = "data/runs"
    datasets: list[DatasetSpec] = Field(min_length=1)
    backbones: list[str] = Field(min_length=1)
    extract: ExtractSpec = Field(default_factory=ExtractSpec)
    probe: ProbeSpec = Field(default_factory=ProbeSpec)
    knn: KnnSpec = Field(default_factory=KnnSpec)
    index: IndexSpec = Field(default_factory=IndexSpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    schedule: ScheduleSpec | None = None
    reset_leaderboard: bool = Field(False, description="start each leaderboard afresh instead of keeping the rows "
                                                       "of backbones not in this run")

    def grid(self) -> tuple[float, ...] | None:
        return tuple(self.probe.grid) if self.probe.grid else None

    @model_validator(mode="after")
    def _no_commands(self) -> RunConfig:
        """A run config is data, and may come from someone else: it may not run a shell command (`pipe:`)."""
        for ds in self.datasets:
            if str(ds.data).startswith("pipe:"):
                raise ValueError(f"dataset {ds.name!r}: data 'pipe:...' runs a shell command, which a run config may "
                                 "not do; stream the shards from http(s) URLs, or run `extract --data 'pipe:...'` "
                                 "yourself")
        return self


def _location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def validation_message(exc: ValidationError, source: str) -> str:
    """One line: every bad field with pydantic's reason (which lists the valid choices for fixed sets)."""
    parts = [f"{_location(e['loc'])}: {e['msg']}" for e in exc.errors()]
    return f"{source}: {'; '.join(parts)}"


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run configuration; relative data paths are relative to the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file at {path}; see README 'Scheduled runs' for an example")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping with at least 'name', 'datasets' and 'backbones'")
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, str(path))) from None
    base = path.parent.resolve()
    for ds in config.datasets:
        if not ds.data.startswith("torchvision:") and not is_stream(ds.data) and not Path(ds.data).is_absolute():
            ds.data = str(base / ds.data)
        if ds.root is not None and not Path(ds.root).is_absolute():
            ds.root = base / ds.root
    if not Path(config.output_dir).is_absolute():
        config.output_dir = str(base / config.output_dir)
    return config


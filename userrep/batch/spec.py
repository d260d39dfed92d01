"""`BatchSpec`: the one settings object of a retrain, with the one set of defaults.

What a batch is built from and with: the CLI builds one from its options, the pipeline carries it
as one `spec` parameter into every step, a Ray cluster's fit receives it as JSON
(`python -m userrep.batch.jobs fit --spec ...`), and the batch's build record and manifest keep it.
KFP passes a dict parameter as a protobuf Struct, where every number is a float: `from_dict`
takes back integral floats for int fields and names the field it cannot take.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BatchSpec:
    data: str  # dataset directory (the data contract)
    batch_root: str  # where batches live (one directory each, plus the serving pointer)
    as_of: str = ""  # "" -> midnight after the last event
    snapshot_id: str = ""  # "" -> materialize now
    batch_id: str = ""  # "" -> derived from data, as_of and settings
    feast_home: str = "work/feast"
    online: str = "sqlite"  # the Feast online store: sqlite or redis
    redis: str = "127.0.0.1:6379"
    dim: int = 64  # embedding dimension
    epochs: int = 20
    # 0: in-process, the fastest fit on one box (bench/fit_throughput.py); N: Ray Train + Ray Data
    workers: int = 0
    average_every: int = 1  # with N >= 2 workers: 1 = DDP; k = local SGD (parameters averaged every k steps)
    label_days: int = 28  # label window of the downstream tasks
    seed: int = 0
    tune: bool = False  # settings from the tune step's choice (`tuned_path`) instead of dim/epochs
    tuned: str = ""  # an explicit tuned.json (`userrep tune`) instead of dim/epochs
    # The batch whose space this one continues (userrep.continuity): "serving" (the batch serving
    # under batch_root when the batch is planned; none yet: a new space), a batch id, or "none".
    align_to: str = "serving"

    def __post_init__(self):
        for name, least in (("dim", 2), ("epochs", 1), ("workers", 0), ("average_every", 1), ("label_days", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"spec.{name}: must be >= {least}, got {getattr(self, name)}")
        if self.online not in ("sqlite", "redis"):
            raise ValueError(f"spec.online: expected sqlite or redis, got {self.online!r}")
        if not self.data or not self.batch_root:
            raise ValueError(f"spec.{'data' if not self.data else 'batch_root'}: required")
        if not self.align_to:
            raise ValueError('spec.align_to: expected "serving", "none" or a batch id')

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BatchSpec:
        """A spec from JSON or a KFP Struct; unknown, missing or mistyped fields are a ValueError naming them."""
        if not isinstance(values, Mapping):
            raise ValueError(f"spec: expected an object of settings, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"spec.{unknown[0]}: unknown setting (known: {', '.join(fields)})")
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in values]
        if required:
            raise ValueError(f"spec.{required[0]}: required")
        return cls(**{name: _typed(name, str(fields[name].type), value) for name, value in values.items()})

    def replace(self, **changes: Any) -> BatchSpec:
        return dataclasses.replace(self, **changes)

    def with_text(self, changes: Mapping[str, str]) -> BatchSpec:
        """This spec with settings given as text (``--param dim=32``), each parsed as its field's type."""
        kinds = {f.name: f.type for f in dataclasses.fields(self)}
        parsed = {}
        for name, text in changes.items():
            if name not in kinds:
                raise ValueError(f"spec.{name}: unknown setting (known: {', '.join(kinds)})")
            parsed[name] = _parse(name, str(kinds[name]), text)
        return BatchSpec.from_dict({**self.to_dict(), **parsed})

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def build_config(self):
        """The core's configs (features, autoencoder, downstream, Feast) for this spec."""
        from userrep.batch.build import BuildConfig
        from userrep.batch.downstream import DownstreamConfig
        from userrep.features import FeatureConfig
        from userrep.model import AEConfig
        from userrep.store import store_config
        from userrep.tasks._mlp import HeadConfig

        ae, head, choice = (
            AEConfig(latent=self.dim, epochs=self.epochs, seed=self.seed),
            HeadConfig(seed=self.seed),
            None,
        )
        tuned = Path(self.tuned) if self.tuned else self.tuned_path() if self.tune else None
        if tuned is not None:
            from userrep.tune import tuned_settings

            if not tuned.is_file():
                raise ValueError(f"spec.tuned: {tuned}: no such file (write it with `userrep tune`)")
            ae, head, choice = tuned_settings(tuned, self.seed)
        return BuildConfig(
            features=FeatureConfig(seed=self.seed),
            ae=dataclasses.replace(ae, average_every=self.average_every),
            workers=self.workers,
            feast=store_config(self.feast_home, self.online, self.redis),
            downstream=DownstreamConfig(label_days=self.label_days, head=head, seed=self.seed),
            tuned=choice,
        )

    def resolved_as_of(self):
        from userrep.batch.build import dataset_as_of
        from userrep.features import to_utc

        return to_utc(self.as_of) if self.as_of else dataset_as_of(self.data)

    def tuned_path(self) -> Path:
        """Where the tune step writes its choice for this data, cut-off and seed: a fixed place,
        so the plan step, the fit and the exit handler all derive the same settings and batch id."""
        from userrep.fsio import data_fingerprint

        as_of = self.resolved_as_of()
        key = json.dumps(
            {"data": data_fingerprint(self.data), "as_of": as_of.isoformat(), "seed": self.seed}, sort_keys=True
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:8]
        return Path(self.batch_root) / "_tuning" / f"{as_of:%Y%m%d}-{digest}" / "tuned.json"

    def anchor(self) -> str:
        """The id of the batch this one continues (``align_to`` resolved now), or "none"."""
        if self.align_to == "none":
            return "none"
        from userrep.batch.registry import batch_dir, serving_batch

        if self.align_to == "serving":
            serving = serving_batch(self.batch_root) if Path(self.batch_root).is_dir() else None
            return serving or "none"
        try:
            batch_dir(self.batch_root, self.align_to)
        except ValueError as exc:
            raise ValueError(f"spec.align_to: {exc}") from None
        return self.align_to

    def anchor_dir(self) -> Path | None:
        """The directory of the batch this one continues (None: a new space)."""
        anchor = self.anchor()
        return None if anchor == "none" else Path(self.batch_root) / anchor

    def batch_dir_and_id(self) -> tuple[Path, str, str]:
        """(batch dir, batch id, as_of ISO): what a run of this spec writes."""
        from userrep.batch.build import default_batch_id
        from userrep.fsio import data_fingerprint

        as_of = self.resolved_as_of()
        batch_id = self.batch_id or default_batch_id(as_of, data_fingerprint(self.data), self.build_config())
        return Path(self.batch_root) / batch_id, batch_id, as_of.isoformat()


def _parse(name: str, kind: str, text: str) -> Any:
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"spec.{name}: expected an integer, got {text!r}") from None
    if kind == "bool":
        if text.lower() in ("true", "1", "yes", "false", "0", "no"):
            return text.lower() in ("true", "1", "yes")
        raise ValueError(f"spec.{name}: expected true or false, got {text!r}")
    return text


def _typed(name: str, kind: str, value: Any) -> Any:
    """`value` as the field's type (annotations are strings here: `from __future__ import annotations`)."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # a KFP Struct's number
            return int(value)
    elif kind == "str":
        if isinstance(value, str):
            return value
    else:  # a field of a type this function does not know yet: fail loudly, not silently
        raise TypeError(f"BatchSpec.{name}: no conversion for type {kind}")
    raise ValueError(f"spec.{name}: expected {kind}, got {type(value).__name__} {value!r}")


def for_step(spec: Mapping[str, Any]) -> BatchSpec:
    """What a pipeline step starts with: logging configured (the core's lines reach the step's
    log in the KFP UI) and its spec read. A step is a process of its own that ends after the step:
    at exit, what it allocated is frozen out of the garbage collector's last pass, which took
    0.5-2 s per step with torch and Feast loaded and collects nothing the exit does not free."""
    import atexit
    import gc

    from userrep.logs import configure

    configure()
    atexit.unregister(gc.freeze)  # once, however many steps one process runs (tests)
    atexit.register(gc.freeze)
    return BatchSpec.from_dict(spec)

"""The recipe's stage bookkeeping: which stages are done, and whether what was done is still what is asked.

A stage is identified by a *fingerprint*: a hash of the config fields that decide its result
(cosmetic fields such as logging intervals left out) and of the runs it starts from (each
input's ``run_id``, which is new every time that stage finishes). So a stage re-runs when its
own config changed or when any stage upstream of it re-ran, and everything downstream follows.

Layout: ``<workdir>/<stage>/stage.json`` marks a finished stage (fingerprint, inputs, the config
fields that went into the fingerprint, compute); ``fingerprint.json`` is written when a stage
starts, so an interrupted stage resumes only under the config it started with. A stage whose
fingerprint no longer matches is moved to ``<stage>.previous/`` (never silently deleted) and
run again.
"""
from __future__ import annotations

import hashlib
import json
import uuid

from etils import epath

from btx_jax import distributed

# Fields that change how a stage reports, not what it computes.
COSMETIC = {
    "train": ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "peak_flops",
              "init_from"),  # init_from: a path; what it points to is fingerprinted as an input
    "mix": ("output", "experts", "seed"),  # paths too; their stages are inputs
    # how the same computation is executed (loop unrolling, rematerialisation, the CPU grouped
    # matmul's blocks): like the mesh, they change speed and memory, not the numbers (up to float rounding)
    "model": ("scan_unroll", "remat"),
    "moe": ("grouped_impl", "grouped_block"),
}  # the mesh section is never fingerprinted, for the same reason


def flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_cosmetic(key: str) -> bool:
    """Whether a flattened field ("section.name") is left out of fingerprints."""
    section, _, name = key.partition(".")
    return name in COSMETIC.get(section, ())


def relevant_config(config, sections: tuple[str, ...]) -> dict:
    """The flattened fields of `sections` that decide a stage's result."""
    tree = json.loads(config.to_json())
    kept = {}
    for section in sections:
        kept.update({k: v for k, v in flatten(tree[section], f"{section}.").items() if not is_cosmetic(k)})
    return kept


def fingerprint(fields: dict, inputs: dict[str, str]) -> str:
    blob = json.dumps({"config": fields, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def only_new_defaults(old: dict, fields: dict, inputs: dict) -> list[str] | None:
    """The fields that `fields` adds to a record's config at their schema defaults, when that is the only
    difference (None otherwise): a config option added to btx_jax later, or a field declared cosmetic
    later (recorded, now left out), must not re-run finished work."""
    from btx_jax.config import base_config

    before = {k: v for k, v in old.get("config", {}).items() if not is_cosmetic(k)}
    if old.get("inputs") != inputs or any(k not in fields or fields[k] != v for k, v in before.items()):
        return None
    defaults = flatten(json.loads(base_config().to_json()))
    added = sorted(k for k in fields if k not in before)
    return added if all(k in defaults and defaults[k] == fields[k] for k in added) else None


def describe_change(old: dict, new_fields: dict, new_inputs: dict) -> str:
    """A short human description of why a stage's fingerprint changed."""
    if "fingerprint" not in old:
        return "it was recorded without a fingerprint (an older version)"
    before = old.get("config", {})
    changed = [f"{k}: {before.get(k, '<unset>')!r} -> {new_fields.get(k, '<unset>')!r}"
               for k in sorted(set(before) | set(new_fields)) if before.get(k) != new_fields.get(k)]
    reran = sorted(s for s in set(old.get("inputs", {})) | set(new_inputs)
                   if old.get("inputs", {}).get(s) != new_inputs.get(s))
    parts = []
    if changed:
        parts.append("config changed (" + "; ".join(changed[:6]) + (" ..." if len(changed) > 6 else "") + ")")
    if reran:
        parts.append("its inputs re-ran (" + ", ".join(reran) + ")")
    return " and ".join(parts) or "its fingerprint changed"


class StageStore:
    """Finished-stage records under a workdir, checked against the fingerprint each stage has now."""

    def __init__(self, workdir, out=print, rerun_from: str = ""):
        self.workdir, self.out = epath.Path(workdir), out
        self.rerun_from = [s.strip() for s in rerun_from.split(",") if s.strip()]
        self.records: dict[str, dict] = {}
        self._forced_done: set[str] = set()
        self._pending: dict[str, dict] = {}

    def path(self, stage: str) -> epath.Path:
        return self.workdir / stage

    def _read(self, stage: str, name: str) -> dict | None:
        marker = self.path(stage) / name
        return json.loads(marker.read_text()) if marker.exists() else None

    def _forced(self, stage: str) -> bool:
        return stage not in self._forced_done and any(
            stage == name or stage.startswith(name.rstrip("/") + "/") for name in self.rerun_from)

    def status(self, stage: str, fields: dict, inputs: list[str]) -> str:
        """done (finished under this fingerprint) | stale (finished under another, or rerun_from names it) |
        started (interrupted) | todo. Reads only: `--plan` uses it. The inputs' records must be loaded."""
        input_ids = {s: self.records[s]["run_id"] for s in inputs}
        fp = fingerprint(fields, input_ids)
        done = self._read(stage, "stage.json")
        if done is not None:
            current = done.get("fingerprint") == fp or only_new_defaults(done, fields, input_ids) is not None
            return "done" if current and not self._forced(stage) else "stale"
        return "started" if self._read(stage, "fingerprint.json") is not None else "todo"

    def load(self, stage: str) -> dict:
        """A finished stage's record (after :meth:`status` said done), kept for the stages that read it."""
        self.records[stage] = self._read(stage, "stage.json")
        return self.records[stage]

    def begin(self, stage: str, fields: dict, inputs: list[str]) -> dict | None:
        """The finished record if the stage is done under this fingerprint; otherwise prepares a (re)run
        (moving a stale run aside) and returns None."""
        input_ids = {s: self.records[s]["run_id"] for s in inputs}
        fp = fingerprint(fields, input_ids)
        done = self._read(stage, "stage.json")
        started = self._read(stage, "fingerprint.json")
        for name, record in (("stage.json", done), ("fingerprint.json", started)):
            added = only_new_defaults(record, fields, input_ids) if record and record.get("fingerprint") != fp else None
            if added is not None:  # fields added since (at their defaults) or now cosmetic: nothing changed
                record.update(fingerprint=fp, config=fields)
                if distributed.is_main():
                    _write_json(self.path(stage) / name, record)
                if name == "stage.json" or done is None:
                    why = (f"recorded before {', '.join(added)} existed; at their defaults they change nothing"
                           if added else "recorded with settings that change only speed or memory, no longer "
                           "part of its fingerprint")
                    self.out(f"[recipe] {stage}: {why}, so the record stands")
        stale = None
        if self._forced(stage):
            stale = "recipe.rerun_from asks for it"
            self._forced_done.add(stage)
        elif done is not None and done.get("fingerprint") != fp:
            stale = describe_change(done, fields, input_ids)
        elif done is None and started is not None and started.get("fingerprint") != fp:
            stale = "its interrupted run " + describe_change(started, fields, input_ids)
        if stale is None and done is not None:
            self.out(f"[recipe] {stage}: done, skipping")
            self.records[stage] = done
            return done
        main = distributed.is_main()  # in a multi-process job, process 0 changes the shared files
        if stale is not None and self.path(stage).exists():
            previous = self.workdir / f"{stage}.previous"
            if main and previous.exists():
                previous.rmtree()
            if main:
                self.path(stage).rename(previous)
            self.out(f"[recipe] {stage}: re-running because {stale}; the old run is in {previous}")
        record = {"fingerprint": fp, "inputs": input_ids, "config": fields}
        if main:
            self.path(stage).mkdir(parents=True, exist_ok=True)
            _write_json(self.path(stage) / "fingerprint.json", record)
        distributed.barrier(f"begin {stage}")
        self._pending[stage] = record
        return None

    def finish(self, stage: str, record: dict) -> dict:
        record = {**record, **self._pending.pop(stage), "run_id": uuid.uuid4().hex[:12]}
        if distributed.is_main():
            _write_json(self.path(stage) / "stage.json", record)
        distributed.barrier(f"finish {stage}")
        self.records[stage] = self._read(stage, "stage.json")  # process 0's run_id, in every process
        return self.records[stage]


def _write_json(path: epath.Path, obj) -> None:
    """Written under a temporary name and renamed, so a reader never sees half a file."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)

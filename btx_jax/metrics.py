"""Metrics to TensorBoard (tensorboardX, no TensorFlow) and to ``workdir/metrics.jsonl``.

The workdir may be a URL (``gs://...``, see :mod:`btx_jax.paths`): an object there cannot be
appended to, so metrics.jsonl and the TensorBoard event file are rewritten whole at most every
``flush_secs`` and on close (a local file gets each line as it is written).
"""
from __future__ import annotations

import io
import json
import time

import numpy as np
from tensorboardX import SummaryWriter, record_writer

from btx_jax import paths


class _URLEventFile:
    """A TensorBoard event file at a URL, through etils.epath: kept in memory, uploaded whole on flush."""

    def __init__(self, path: str):
        self.path, self.buffer, self.dirty = paths.resolve(path), io.BytesIO(), False

    def write(self, data: bytes) -> None:
        self.buffer.write(data)
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            self.path.write_bytes(self.buffer.getvalue())
            self.dirty = False

    def close(self) -> None:
        self.flush()


class _URLEventFiles:
    """tensorboardX's writer factory for the URL schemes (its own gs:// writer needs another client and
    uploads again whenever it is garbage-collected)."""

    def open(self, path: str) -> _URLEventFile:
        return _URLEventFile(path)

    def directory_check(self, path: str) -> None:
        pass  # an object store has no directories to create


for _scheme in paths.SCHEMES:
    record_writer.register_writer_factory(_scheme, _URLEventFiles())


class MetricsWriter:
    """One JSON object per line (``step`` plus scalars) and the same scalars in TensorBoard.

    On resume from step S the lines of steps > S (written after the checkpoint by the run
    that was interrupted) are dropped, so each step appears once.
    """

    def __init__(self, workdir, resume_step: int = 0, enabled: bool = True, flush_secs: float = 10):
        self.enabled = enabled
        workdir = paths.resolve(workdir)
        self.path = workdir / "metrics.jsonl"
        if not enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        self._remote, self._flush_secs = paths.is_url(workdir), flush_secs
        self._lines = [line for line in self._read_lines() if json.loads(line)["step"] <= resume_step]
        self._upload()  # the truncated file
        self.tb = SummaryWriter(str(workdir / "tensorboard"), flush_secs=flush_secs)
        self._heatmap = UsageHeatmap()
        if not self._remote:
            self._file, self._lines = self.path.open("a", encoding="utf-8"), None

    def _read_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return [line if line.endswith("\n") else line + "\n" for line in self.path.read_text().splitlines() if line.strip()]

    def _upload(self) -> None:
        if self._remote:  # an object store replaces an object whole when its upload completes
            self.path.write_text("".join(self._lines))
        else:  # a local file is written under a temporary name and renamed, so it is never seen half-written
            tmp = self.path.parent / (self.path.name + ".tmp")
            tmp.write_text("".join(self._lines))
            tmp.replace(self.path)
        self._uploaded = time.monotonic()

    def _write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if not self._remote:
            self._file.write(line)
            self._file.flush()
            return
        self._lines.append(line)
        if time.monotonic() - self._uploaded >= self._flush_secs:
            self._upload()

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(np.asarray(v)) for k, v in values.items()}
        for name, value in clean.items():
            self.tb.add_scalar(name, value, step)
        self._write({"step": int(step), **clean})

    def router_stats(self, step: int, per_layer: dict) -> None:
        """MoE router metrics, each [L_moe] (``expert_usage`` [L_moe, E]): per-layer scalars, the
        mean over layers, usage histograms and a layer x expert usage heatmap; the arrays go to
        metrics.jsonl as lists under ``moe/<name>``."""
        if not self.enabled:
            return
        for name, values in per_layer.items():
            values = np.asarray(values, np.float64)
            if name == "expert_usage":
                for layer, usage in enumerate(values):
                    self.tb.add_histogram(f"moe/layer{layer}/expert_usage", usage, step,
                                          bins=np.arange(len(usage) + 1) - 0.5)
                self.tb.add_image("moe/expert_usage_heatmap", self._heatmap(values), step, dataformats="HWC")
            else:
                self.tb.add_scalar(f"moe/{name}", float(values.mean()), step)
                for layer, value in enumerate(values):
                    self.tb.add_scalar(f"moe/layer{layer}/{name}", float(value), step)
        record = {f"moe/{k}": np.asarray(v, np.float64).round(6).tolist() for k, v in per_layer.items()}
        self._write({"step": int(step), **record})

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def flush(self) -> None:
        """Everything written so far reaches storage now (on a URL, call it after each checkpoint so a
        killed run keeps the lines of the steps it will resume after)."""
        if self.enabled:
            self.tb.flush()
            if self._remote:
                self._upload()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            if self._remote:
                self._upload()
            else:
                self._file.close()


class UsageHeatmap:
    """[layers, experts] fractions -> an RGB image (uint8 HWC) of the heatmap, for TensorBoard.

    The figure is built once and only its data and colour range change between calls: drawing
    it again costs ~35 ms, building it ~140 ms (a train step of the tests' tiny MoE costs less)."""

    def __init__(self, title: str = "fraction of routed tokens"):
        self.title, self._figure, self._image, self._shape = title, None, None, None

    def _build(self, usage: np.ndarray) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        layers, experts = usage.shape
        self._figure = Figure(figsize=(1.2 + 0.5 * experts, 1.0 + 0.4 * layers), dpi=80)
        FigureCanvasAgg(self._figure)
        ax = self._figure.add_subplot()
        self._image = ax.imshow(usage, cmap="viridis", vmin=0.0, aspect="auto")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(experts))
        ax.set_yticks(range(layers))
        ax.set_title(self.title, fontsize=9)
        self._figure.colorbar(self._image, ax=ax)
        self._figure.tight_layout()
        self._shape = usage.shape

    def __call__(self, usage: np.ndarray) -> np.ndarray:
        usage = np.asarray(usage, np.float64)
        if usage.shape != self._shape:
            self._build(usage)
        self._image.set_data(usage)
        self._image.set_clim(0.0, max(float(usage.max()), 1e-12))
        self._figure.canvas.draw()
        return np.asarray(self._figure.canvas.buffer_rgba())[..., :3].copy()


def read_metrics(workdir) -> list[dict]:
    """All lines of a run's metrics.jsonl."""
    text = (paths.resolve(workdir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]

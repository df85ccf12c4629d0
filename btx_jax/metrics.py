"""Metrics to TensorBoard (tensorboardX, no TensorFlow) and to ``workdir/metrics.jsonl``."""
from __future__ import annotations

import json
import os

import numpy as np
from tensorboardX import SummaryWriter


class MetricsWriter:
    """One JSON object per line (``step`` plus scalars) and the same scalars in TensorBoard.

    On resume from step S the lines of steps > S (written after the checkpoint by the run
    that was interrupted) are dropped, so each step appears once.
    """

    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate_after(resume_step)
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)
        self._file = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(np.asarray(v)) for k, v in values.items()}
        for name, value in clean.items():
            self.tb.add_scalar(name, value, step)
        self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._file.flush()

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
                self.tb.add_image("moe/expert_usage_heatmap", usage_heatmap(values), step, dataformats="HWC")
            else:
                self.tb.add_scalar(f"moe/{name}", float(values.mean()), step)
                for layer, value in enumerate(values):
                    self.tb.add_scalar(f"moe/layer{layer}/{name}", float(value), step)
        record = {f"moe/{k}": np.asarray(v, np.float64).round(6).tolist() for k, v in per_layer.items()}
        self._file.write(json.dumps({"step": int(step), **record}) + "\n")
        self._file.flush()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self._file.close()


def usage_heatmap(usage: np.ndarray, title: str = "fraction of routed tokens") -> np.ndarray:
    """[layers, experts] fractions -> an RGB image (uint8 HWC) of the heatmap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, experts = usage.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * experts, 1.0 + 0.4 * layers), dpi=80)
    im = ax.imshow(usage, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(experts))
    ax.set_yticks(range(layers))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def read_metrics(workdir: str) -> list[dict]:
    """All lines of a run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

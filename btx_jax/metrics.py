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

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self._file.close()


def read_metrics(workdir: str) -> list[dict]:
    """All lines of a run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

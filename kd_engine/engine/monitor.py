"""Training telemetry: TensorBoard through DeepSpeed's monitor (rank 0), a tqdm bar on rank 0, a JSONL log."""
from __future__ import annotations

import json
import math
import logging
import os
from typing import Optional

logger = logging.getLogger("kd_engine")


class Monitor:
    def __init__(self, engine, output_dir: str, rank: int, total_steps: int, start_step: int, disable_tqdm: bool):
        self.engine = engine
        self.rank = rank
        self.is_main = rank == 0
        self.bar = None
        self.log_path = os.path.join(output_dir, "train_log.jsonl")
        if self.is_main and not disable_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        """Write scalars to TensorBoard (rank 0, via the DeepSpeed monitor) and the JSONL log."""
        if not self.is_main:
            return
        mon = getattr(self.engine, "monitor", None)
        if mon is not None and getattr(mon, "enabled", False):
            mon.write_events([(f"{prefix}/{k}", float(v), step) for k, v in values.items()])  # flushes
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"split": prefix, "step": step, **{k: float(v) for k, v in values.items()}}) + "\n")

    def progress(self, step: int, shown: Optional[dict] = None) -> None:
        if self.bar is not None:
            self.bar.n = step
            if shown:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self.bar.refresh()
        elif not self.is_main and shown and step % 50 == 0:
            logger.info("rank %d step %d %s", self.rank, step, shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # ---- the JSONL log across a resume ------------------------------------------------------------------
    @staticmethod
    def log_size(output_dir: str) -> int:
        """Bytes of train_log.jsonl now (stored in every checkpoint)."""
        path = os.path.join(output_dir, "train_log.jsonl")
        return os.path.getsize(path) if os.path.exists(path) else 0

    @staticmethod
    def truncate_log(output_dir: str, size, rank: int = 0) -> None:
        """Cut train_log.jsonl back to what it held when the resumed checkpoint was written: lines logged after it
        (the steps a crash lost, a final evaluation before a crashed export) are logged again by the resumed run,
        so every step and evaluation appears once."""
        path = os.path.join(output_dir, "train_log.jsonl")
        if rank == 0 and size is not None and os.path.exists(path) and os.path.getsize(path) > int(size):
            with open(path, "r+b") as fh:
                fh.truncate(int(size))


def perplexities(metrics: dict[str, float], lm_loss_key) -> dict[str, float]:
    """``perplexity`` = exp(the loss the method names as its LM loss, ``Method.lm_loss_key``), and
    ``teacher_perplexity`` from ``teacher_<that key>`` where the method reports the teacher's own loss."""
    out = {}
    if lm_loss_key:
        for prefix in ("", "teacher_"):
            if prefix + lm_loss_key in metrics:
                out[prefix + "perplexity"] = math.exp(min(metrics[prefix + lm_loss_key], 50.0))
    return out

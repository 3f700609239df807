"""Training telemetry: TensorBoard through DeepSpeed's monitor (rank 0), a tqdm bar on rank 0, a JSONL log."""
from __future__ import annotations

import json
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

"""Command line: parse the config, run the trainer, turn user errors into one clear message and exit code 2."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) or 0)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s] [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Optional[list[str]] = None) -> int:
    from .errors import KDError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from .config import build_config, help_text

        if "--help" in argv or "-h" in argv:
            method = None
            if "--method" in argv and argv.index("--method") + 1 < len(argv):
                method = argv[argv.index("--method") + 1]
            print(help_text(method))
            return 0
        parsed = build_config(argv)
        _setup_logging()
        from .dist import setup_environment

        setup_environment()  # before deepspeed is imported: selects the CPU accelerator when there is no GPU
        from .engine.trainer import Trainer

        metrics = Trainer(parsed).fit()
        if int(os.environ.get("RANK", "0")) == 0:
            if metrics:  # a run without evaluation data has none: no empty line
                print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
            print(f"results in {parsed.train.output_dir}", flush=True)
        return 0
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

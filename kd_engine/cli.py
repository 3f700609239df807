"""Command line: parse the config, run the trainer, turn user errors into one clear message and exit code 2."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

# third-party chatter (weight loading, dataset generation, shard writing bars, info logs) unless --verbose
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "warning", "DATASETS_VERBOSITY": "warning",
              "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def _setup_logging(verbose: bool) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) or 0)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s] [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose:  # undo a quiet setting an earlier in-process run left in this environment (or its children's)
        for k, v in _QUIET_ENV.items():
            if os.environ.get(k) == v:
                del os.environ[k]
    else:
        for k, v in _QUIET_ENV.items():
            os.environ.setdefault(k, v)
        for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx", "urllib3", "transformers"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        for mod in ("transformers.utils.logging", "datasets.utils.logging"):
            if mod in sys.modules:  # already imported (in-process callers): switch their bars off directly
                sys.modules[mod].disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _relabel_logging(split) -> None:
    """After the world split: log lines name the global rank and role; the student group's rank 0 logs INFO."""
    main = split.role == "student" and split.group_rank == 0
    logging.getLogger().setLevel(logging.INFO if main else logging.WARNING)
    fmt = logging.Formatter(f"[%(asctime)s] [rank {split.global_rank} {split.role}] %(levelname)s %(name)s: "
                            "%(message)s", datefmt="%H:%M:%S")
    for h in logging.getLogger().handlers:
        h.setFormatter(fmt)


def final_line(cfg, steps: int, metrics: dict) -> str:
    """The last line of a successful run: where the student went and the key metrics."""
    where = os.path.join(cfg.output_dir, "final") if cfg.export else os.path.join(cfg.output_dir, "checkpoints")
    what = "student exported to" if cfg.export else "checkpoints in"
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()) or "no evaluation data"
    return f"done: {steps} steps; {what} {os.path.abspath(where)}; {shown}"


def main(argv: Optional[list[str]] = None) -> int:
    from .dist import end_process
    from .engine.signals import EXIT_STOPPED

    rc = _run(argv)
    return end_process(rc, meet=rc in (0, EXIT_STOPPED))


def _run(argv: Optional[list[str]]) -> int:
    from .engine.signals import EXIT_STOPPED, Stopped
    from .errors import KDError

    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = None
    try:
        from .config import build_config, help_text

        if "--help" in argv or "-h" in argv:
            method = None
            if "--method" in argv and argv.index("--method") + 1 < len(argv):
                method = argv[argv.index("--method") + 1]
            print(help_text(method))
            return 0
        parsed = build_config(argv)
        _setup_logging(parsed.train.verbose)
        from .dist import setup_environment

        setup_environment()  # before deepspeed is imported: selects the CPU accelerator when there is no GPU
        from .validate import preflight

        preflight(parsed)  # files and the DeepSpeed JSON, before the heavy imports and before any write
        if parsed.train.teacher_ranks > 0:  # a teacher group of its own: the first ranks serve, the others train
            from .engine.world_split import split_world

            split = split_world(parsed.train.teacher_ranks, parsed.train.dist_timeout)
            _relabel_logging(split)
            if split.role == "teacher":
                from .engine.teacher_server import serve

                return serve(parsed, split)
        from .engine.trainer import Trainer

        trainer = Trainer(parsed)
        metrics = trainer.fit()
        if int(os.environ.get("RANK", "0")) == 0:
            print(final_line(parsed.train, trainer.global_step, metrics), flush=True)
        return 0
    except Stopped as exc:  # a stop signal: checkpoint written (and the SLURM job requeued when asked)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"kd_engine: {exc}", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # a collective that failed because another rank died or hung (--dist_timeout)
        from . import dist
        from .io import free_mib, is_disk_full

        out = parsed.train.output_dir if parsed is not None else None
        if out and is_disk_full(exc, out):  # a log, TensorBoard or export write: checkpoints handle their own
            from .engine.checkpoint import latest_checkpoint

            last = latest_checkpoint(out) if os.path.isdir(out) else None
            print(f"error: no space left on the file system of {out} ({free_mib(out):.1f} MiB free) while writing "
                  f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); newest "
                  f"complete checkpoint: {last[1] if last else '(none)'}; free space, then --resume",
                  file=sys.stderr, flush=True)
            return 2
        if not dist.is_lost_rank_error(exc):
            raise
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        print(f"error: {dist.lost_rank_message(exc, rank, world)}", file=sys.stderr, flush=True)
        os._exit(1)  # the process group is broken: its teardown could wait on the lost rank again


if __name__ == "__main__":
    sys.exit(main())

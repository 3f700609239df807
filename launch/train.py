#!/usr/bin/env python
"""kd_engine training entry point.

Works the same under every launcher:
    python launch/train.py --method kd --config cfg.yaml ...
    torchrun --nproc_per_node 2 launch/train.py ...
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json ...
    mpirun -np 2 python launch/train.py ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kd_engine.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

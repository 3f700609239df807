"""kd_engine: distributed knowledge distillation for transformer models on DeepSpeed."""

__version__ = "0.1.0"

"""Batch geometry (micro-batch, accumulation, global batch) is resolved once, first, from the YAML / command line and
the DeepSpeed JSON; explicit values that disagree are an error naming both."""
import pytest

from kd_engine.batch_geometry import resolve_batch_geometry
from kd_engine.config import TrainConfig, build_config
from kd_engine.errors import ConfigError


def test_json_values_override_defaults():
    cfg = TrainConfig()  # defaults: micro 8, accumulation 1
    geo = resolve_batch_geometry(cfg, {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}, 3,
                                 "ds.json")
    assert (geo.micro, geo.accumulation, geo.global_batch) == (2, 4, 24)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (2, 4)


def test_auto_keeps_ours_and_train_batch_size_derives_accumulation():
    cfg = TrainConfig(per_device_train_batch_size=4)
    geo = resolve_batch_geometry(cfg, {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": 32}, 2, "x")
    assert (geo.micro, geo.accumulation, geo.global_batch) == (4, 4, 32)


def test_explicit_disagreement_names_both_places():
    cfg = TrainConfig(per_device_train_batch_size=4)
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size=4 \(run.yaml\).*"
                                          r"train_micro_batch_size_per_gpu=2 in ds.json"):
        resolve_batch_geometry(cfg, {"train_micro_batch_size_per_gpu": 2}, 1, "ds.json",
                               {"per_device_train_batch_size": "run.yaml"})
    cfg = TrainConfig(gradient_accumulation_steps=3)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=3 \\(the command line\\)"):
        resolve_batch_geometry(cfg, {"gradient_accumulation_steps": 4}, 1, "ds.json",
                               {"gradient_accumulation_steps": "the command line"})
    # the same value in both places is fine
    cfg = TrainConfig(per_device_train_batch_size=2)
    assert resolve_batch_geometry(cfg, {"train_micro_batch_size_per_gpu": 2}, 1, "x",
                                  {"per_device_train_batch_size": "the command line"}).micro == 2


def test_explicit_accumulation_is_not_rederived_from_train_batch_size():
    cfg = TrainConfig(per_device_train_batch_size=4, gradient_accumulation_steps=1)
    with pytest.raises(ConfigError, match="inconsistent batch sizes"):
        resolve_batch_geometry(cfg, {"train_batch_size": 16}, 1, "x", {"gradient_accumulation_steps": "cli"})


@pytest.mark.parametrize("bad", [0, -2, 1.5, "four", True])
def test_json_batch_values_must_be_positive_integers(bad):
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu' must be a positive integer"):
        resolve_batch_geometry(TrainConfig(), {"train_micro_batch_size_per_gpu": bad}, 1, "x")


def test_build_config_records_where_keys_were_set(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("per_device_train_batch_size: 4\nlearning_rate: 0.1\n")
    parsed = build_config(["--config", str(yml), "--gradient_accumulation_steps", "2", "--temperature", "3"])
    assert parsed.explicit["per_device_train_batch_size"] == str(yml)
    assert parsed.explicit["gradient_accumulation_steps"] == "the command line"
    assert "temperature" not in parsed.explicit  # method options are not engine keys
    parsed = build_config(["--config", str(yml), "--per_device_train_batch_size", "2"])
    assert parsed.explicit["per_device_train_batch_size"] == "the command line"  # the command line wins

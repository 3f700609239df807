"""Which Adam DeepSpeed builds per device (ds_config.choose_adam_implementation), and that the fast one trains the
same: losses pinned against torch's single-tensor AdamW (same math, rounding only), ZeRO 1-3 accept it."""
import copy
import json

import pytest
import torch

import tiny
from kd_engine.config import build_config
from kd_engine.ds_config import load_ds_config, resolve_ds_config


@pytest.fixture(scope="module", autouse=True)
def _single_process_env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


def _cfg():
    return build_config(["--method", "kd", "--teacher", "t", "--per_device_train_batch_size", "8",
                         "--learning_rate", "1e-2"]).train


def _params(ds_json, on_cpu=True):
    ds = resolve_ds_config(copy.deepcopy(ds_json), _cfg(), world_size=1, total_steps=5, on_cpu=on_cpu)
    return ds["optimizer"]["params"]


def test_cpu_gets_torch_fused_adamw_gpu_keeps_deepspeed_fused_adam():
    zero0 = load_ds_config("ds_configs/zero0.json")
    cpu = _params(zero0)
    assert cpu["torch_adam"] is True and cpu["fused"] is True
    gpu = _params(zero0, on_cpu=False)  # no torch_adam: DeepSpeed builds its FusedAdam
    assert "torch_adam" not in gpu and "fused" not in gpu
    # what the user wrote is kept: foreach, an explicit fused false, DeepSpeed's own op
    for own in ({"foreach": True}, {"fused": False}, {"torch_adam": False}):
        ds = copy.deepcopy(zero0)
        ds["optimizer"]["params"].update(own)
        p = _params(ds)
        assert all(p[k] == v for k, v in own.items())
        assert "fused" not in p or p["fused"] == own.get("fused")
    # optimizer offload: DeepSpeed picks DeepSpeedCPUAdam, nothing added
    off = load_ds_config("ds_configs/zero2.json")
    off["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    p = _params(off)
    assert "torch_adam" not in p and "fused" not in p
    # not an Adam: untouched
    sgd = {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    assert "fused" not in _params(sgd)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_accepts_the_fused_torch_adamw_and_matches_single_tensor(stage):
    """DeepSpeed wraps the torch optimizer (ZeRO 1-3: one flat fp32 partition per group) and steps it; the fused
    and the single-tensor AdamW give the same losses to float rounding."""
    import deepspeed

    losses = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
        ds = load_ds_config(f"ds_configs/zero{stage}.json")
        if not fused:
            ds["optimizer"]["params"]["fused"] = False
        ds = resolve_ds_config(ds, _cfg(), world_size=1, total_steps=5, on_cpu=True)
        if stage == 3:
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        eng, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
        inner = getattr(eng.optimizer, "optimizer", eng.optimizer)
        assert isinstance(inner, torch.optim.AdamW) and bool(inner.defaults["fused"]) is fused
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
        out = []
        for _ in range(5):
            loss = eng(x).pow(2).mean()
            eng.backward(loss)
            eng.step()
            out.append(float(loss))
        losses[fused] = out
    assert losses[True][0] == losses[False][0]  # same start
    assert losses[True][-1] < losses[True][0]  # it trains
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-7)


def test_kd_losses_pinned_fused_vs_single_tensor(tmp_path):
    """Four kd steps through the Trainer with the default (fused) optimizer and with torch's single-tensor AdamW
    (the optimizer before this change): the same losses to rounding, and the engine really holds the fused one."""
    from kd_engine.engine.trainer import Trainer

    tiny.make_llama(str(tmp_path / "teacher"), layers=4)
    tiny.write_lines(str(tmp_path / "train.txt"), tiny.sentences(48))
    single = load_ds_config("ds_configs/zero0.json")
    single["optimizer"]["params"]["fused"] = False
    (tmp_path / "single.json").write_text(json.dumps(single))
    runs = {}
    for name, extra in (("fused", []), ("single", ["--deepspeed", str(tmp_path / "single.json")])):
        tr = Trainer(build_config([
            "--method", "kd", "--teacher", str(tmp_path / "teacher"), "--student.layers", "2",
            "--train_file", str(tmp_path / "train.txt"), "--output_dir", str(tmp_path / name), "--max_steps", "4",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--disable_tqdm", "true", "--export", "false", *extra]))
        tr.fit()
        assert bool(tr.student.optimizer.defaults["fused"]) is (name == "fused")
        log = [json.loads(line) for line in open(tmp_path / name / "train_log.jsonl")]
        runs[name] = [r["loss"] for r in log if r["split"] == "train"]
    assert len(runs["fused"]) == 4 and runs["fused"][0] == runs["single"][0]
    assert runs["fused"][-1] != runs["fused"][0]
    torch.testing.assert_close(torch.tensor(runs["fused"]), torch.tensor(runs["single"]), rtol=1e-5, atol=1e-6)


def test_single_rank_zero0_skips_deepspeeds_allreduce_with_identical_losses(tmp_path, monkeypatch):
    """One rank at ZeRO-0: the trainer turns off DeepSpeed's per-step flatten/all-reduce/copy-back of every gradient
    (a no-op over one rank); the losses are bit for bit those of a run that keeps it. ZeRO 1-3 keep it."""
    from kd_engine.engine.trainer import Trainer

    tiny.make_llama(str(tmp_path / "teacher"), layers=4)
    tiny.write_lines(str(tmp_path / "train.txt"), tiny.sentences(48))
    z1 = tmp_path / "zero1.json"
    z1.write_text(json.dumps(load_ds_config("ds_configs/zero1.json")))

    def run(name, *extra):
        tr = Trainer(build_config([
            "--method", "kd", "--teacher", str(tmp_path / "teacher"), "--student.layers", "2",
            "--train_file", str(tmp_path / "train.txt"), "--output_dir", str(tmp_path / name), "--max_steps", "3",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--disable_tqdm", "true", "--export", "false", *extra]))
        tr.fit()
        log = [json.loads(line) for line in open(tmp_path / name / "train_log.jsonl")]
        return tr, [r["loss"] for r in log if r["split"] == "train"]

    tr, skipped = run("skip")
    assert tr.student.enable_backward_allreduce is False
    tr1, _ = run("zero1", "--deepspeed", str(z1))
    assert tr1.student.enable_backward_allreduce is True
    monkeypatch.setattr("kd_engine.engine.trainer.skip_single_rank_allreduce", lambda engine, world_size: engine)
    tr, kept = run("kept")
    assert tr.student.enable_backward_allreduce is True
    assert len(skipped) == 3 and skipped == kept and skipped[-1] != skipped[0]

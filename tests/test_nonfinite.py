"""Non-finite guard with real DeepSpeed on CPU: injected NaN loss / NaN gradients / inf weights (faults.py)."""
import json
import os

import pytest
import torch

import tiny
from kd_engine.cli import main as cli_main


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("nonfinite")
    tiny.make_llama(str(d / "teacher"), layers=2)
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(64))
    tiny.write_lines(str(d / "eval.txt"), tiny.sentences(8, seed=1))
    return d


def _args(d, out, *extra):
    return ["--method", "kd", "--teacher", str(d / "teacher"), "--student.layers", "1", "--train_file",
            str(d / "train.txt"), "--eval_file", str(d / "eval.txt"), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--disable_tqdm", "true", *extra]


def _log(out):
    return [json.loads(line) for line in open(out / "train_log.jsonl")]


def _weights(ck):
    sd = torch.load(ck / "student" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return {k: v.clone() for k, v in sd.items()}


@pytest.mark.parametrize("ds", ["zero0", "zero2"])
def test_nonfinite_loss_and_gradient_steps_are_skipped(assets, tmp_path, monkeypatch, capsys, caplog, ds):
    monkeypatch.setenv("KD_ENGINE_NONFINITE", "loss@2,grad@4")
    out = tmp_path / "o"
    rc = cli_main(_args(assets, out, "--max_steps", "5", "--deepspeed", f"ds_configs/{ds}.json"))
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    warned = caplog.text
    assert "step 2: non-finite loss or gradients" in warned and "step 4: non-finite loss or gradients" in warned
    train = [r for r in _log(out) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in train] == [0, 1, 1, 2, 2]
    assert "loss" not in train[1] and "loss" not in train[3]  # skipped steps' NaN terms are not logged
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train if "loss" in r)
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(out / "final" / "model.safetensors")).values())


def test_nonfinite_streak_stops_with_a_checkpoint_of_the_last_good_state(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KD_ENGINE_NONFINITE", "loss@3-99")
    out = tmp_path / "o"
    rc = cli_main(_args(assets, out, "--max_steps", "10", "--save_steps", "2", "--max_nonfinite_steps", "3",
                        "--save_total_limit", "3"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "3 consecutive steps (up to step 5)" in errors[0], errors
    assert "step-00000005" in errors[0]
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002", "step-00000004", "step-00000005"]
    assert not (out / "final").exists()
    good, last = _weights(out / "checkpoints" / "step-00000002"), _weights(out / "checkpoints" / "step-00000005")
    assert all(torch.equal(good[k], last[k]) for k in good)  # skipped steps did not touch a weight


def test_non_finite_weights_are_never_saved(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KD_ENGINE_NONFINITE", "weights@3")  # a weight becomes inf when step 3 begins
    out = tmp_path / "o"
    rc = cli_main(_args(assets, out, "--max_steps", "10", "--save_steps", "2", "--save_total_limit", "1",
                        "--max_nonfinite_steps", "2"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "weights are not finite at step 4" in errors[0], errors
    assert "step-00000002" in errors[0]
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002"]  # the good one was not rotated out
    assert not (out / "final").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_nonfinite_steps_are_skipped_at_bf16_through_deepspeeds_overflow_path(assets, tmp_path, monkeypatch, capsys,
                                                                              caplog, stage):
    """bf16 at ZeRO-2 and ZeRO-3 (every parameter partitioned): DeepSpeed's own optimizer sees the NaN/inf gradient
    norm and skips the step (no loss scaler at bf16); the guard counts it, no weight changes, nothing NaN is
    exported."""
    import json as _json

    ds = _json.load(open(f"ds_configs/zero{stage}_bf16.json"))
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "ds.json"
    path.write_text(_json.dumps(ds))
    monkeypatch.setenv("KD_ENGINE_NONFINITE", "loss@2,grad@4")
    out = tmp_path / "o"
    rc = cli_main(_args(assets, out, "--max_steps", "5", "--deepspeed", str(path), "--save_steps", "1",
                        "--save_total_limit", "10", "--max_length", "16"))
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert "step 2: non-finite loss or gradients" in caplog.text and "step 4: non-finite" in caplog.text
    train = [r for r in _log(out) if r["split"] == "train"]
    assert [r["skipped_steps"] for r in train] == [0, 1, 1, 2, 2]
    ck = out / "checkpoints"
    from safetensors.torch import load_file

    final = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in final.values())
    assert all(v.dtype == torch.bfloat16 or v.dtype == torch.float32 for v in final.values())
    assert sorted(os.listdir(ck))[-1] == "step-00000005"

    def master(step):  # this rank's fp32 master weights (ZeRO-2: single_partition..., ZeRO-3: fp32_flat_groups)
        d = torch.load(ck / f"step-{step:08d}" / "student" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)["optimizer_state_dict"]
        return torch.cat(d.get("single_partition_of_fp32_groups") or d["fp32_flat_groups"])

    w = {s: master(s) for s in range(1, 6)}
    assert torch.equal(w[1], w[2]) and torch.equal(w[3], w[4])  # the skipped steps changed no weight
    assert not torch.equal(w[2], w[3]) and not torch.equal(w[4], w[5])  # the others did

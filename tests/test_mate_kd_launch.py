"""--method mate_kd under real launchers: exact resume after a SIGKILL in the middle of a cycle (right after a
generator step), 1 rank ZeRO-0 and 2 ranks ZeRO-3 (ZeRO-3 student, generator and partitioned teacher); 2 ranks
ZeRO-2 under the deepspeed launcher."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

import tiny
from test_launch import final_weights, launch
from test_mate_kd_method import make_classifier

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("mate_launch")
    make_classifier(str(d / "teacher"))
    cfg = json.load(open(d / "teacher" / "config.json"))
    cfg.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)  # dropout on: RNG state must be restored
    json.dump(cfg, open(d / "teacher" / "config.json", "w"))
    tiny.write_classification_tsv(str(d / "train.tsv"), 64)
    tiny.write_classification_tsv(str(d / "eval.tsv"), 16, seed=1)
    tiny.ds_config_file(d / "zero3.json")
    return d


def args(assets, out, *extra):
    # cycles of 2 generator + 3 student steps: steps 0,1 G; 2,3,4 S; 5,6 G; 7,8,9 S. The step-6 checkpoint falls
    # right after generator step 5, inside the second cycle.
    return ["--method", "mate_kd", "--teacher", str(assets / "teacher"), "--student.layers", "2",
            "--generator.layers", "1", "--train_file", str(assets / "train.tsv"), "--eval_file",
            str(assets / "eval.tsv"), "--text_column", "sentence", "--label_column", "label", "--max_length", "32",
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--learning_rate", "1e-3", "--generator_lr", "1e-2", "--generator_steps", "2", "--student_steps", "3",
            "--max_steps", "10", "--warmup_steps", "1", "--logging_steps", "1", "--save_steps", "3",
            "--save_total_limit", "3", "--disable_tqdm", "true", "--report_to", "none", *extra]


def mate_rows(out):
    by_step = {}
    for line in open(os.path.join(out, "train_log.jsonl")):
        r = json.loads(line)
        if r["split"] == "mate":
            by_step[r["step"]] = r  # a resumed run re-logs the steps after its checkpoint
    return [by_step[s] for s in sorted(by_step)]


def engine_tensors(ckpt_dir):
    """Every tensor of every file of one engine's DeepSpeed checkpoint (weights, optimizer moments, ZeRO
    partitions), keyed by file and path."""
    out = {}

    def walk(prefix, obj):
        if torch.is_tensor(obj):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    for f in sorted(glob.glob(os.path.join(ckpt_dir, "*.pt"))):
        walk(os.path.basename(f), torch.load(f, map_location="cpu", weights_only=False))
    return out


def generator_weights(step_dir):
    """The generator's full fp32 weights from a checkpoint: consolidated from the ZeRO partitions when there are
    any, else the module state the engine saved."""
    if glob.glob(os.path.join(step_dir, "generator", "zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="generator"))
    return torch.load(os.path.join(step_dir, "generator", "mp_rank_00_model_states.pt"), map_location="cpu",
                      weights_only=False)["module"]


@pytest.mark.parametrize("kind,nproc,extra", [("python", 1, []), ("torchrun", 2, ["--deepspeed", "ZERO3"])],
                         ids=["1rank-zero0", "2rank-zero3"])
def test_exact_resume_mid_cycle_after_kill(assets, tmp_path, kind, nproc, extra):
    extra = [str(assets / "zero3.json") if e == "ZERO3" else e for e in extra]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    r = launch(kind, nproc, args(assets, straight, *extra), tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    # killed when step index 7 (a student step) begins: the last checkpoint is step 6, after generator step 5
    r = launch(kind, nproc, args(assets, crashed, *extra), tmp_path / "cache", {"KD_ENGINE_CRASH_AT_STEP": "8"})
    assert r.returncode != 0
    assert sorted(os.listdir(crashed / "checkpoints")) == ["step-00000003", "step-00000006"]
    assert not (crashed / "final").exists()
    r = launch(kind, nproc, args(assets, crashed, "--resume", *extra), tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = mate_rows(straight), mate_rows(crashed)
    assert [x["step"] for x in a] == list(range(10)) == [x["step"] for x in b]
    assert [x["step_type_generator"] for x in a] == [1, 1, 0, 0, 0, 1, 1, 0, 0, 0]
    assert a == b  # every logged value of every step (losses, D, changed fraction, both lrs), bit for bit
    wa, wb = final_weights(straight), final_weights(crashed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    step10 = os.path.join("checkpoints", "step-00000010")
    ga, gb = generator_weights(straight / step10), generator_weights(crashed / step10)
    assert ga and ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    # optimizer moments and everything else the generator's engine saved (ZeRO-3's raw fp32 partitions aside:
    # their alignment padding is uninitialised memory, compared above as consolidated weights instead)
    sa, sb = engine_tensors(straight / step10 / "generator"), engine_tensors(crashed / step10 / "generator")
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if "fp32_flat_groups" not in k)
    # the generator did train in generator step 6: its weights differ from the step-6 checkpoint's (kept: limit 3)
    g6 = generator_weights(crashed / "checkpoints" / "step-00000006")
    assert any(not torch.equal(g6[k], ga[k]) for k in ga)


def test_two_ranks_zero2_deepspeed_launcher(assets, tmp_path):
    out = tmp_path / "o"
    r = launch("deepspeed", 2, args(assets, out, "--deepspeed", "ds_configs/zero2.json", "--max_steps", "5",
                                    "--save_steps", "0"), tmp_path / "cache")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    rows = mate_rows(out)
    assert [x["step_type_generator"] for x in rows] == [1, 1, 0, 0, 0]
    assert all(x["generator_generator_D"] > 0 for x in rows[:2])
    assert "world size 2" in (r.stdout + r.stderr)
    assert os.path.isfile(out / "final" / "model.safetensors")

"""The engine with real DeepSpeed on CPU: ZeRO 0-3, teacher engine, export, TensorBoard, bad input.

In-process runs share one process group (rank 0 of 1); multi-rank and crash/resume runs are in test_launch.py.
"""
import json
import math
import os

import pytest
import torch

import tiny
from kd_engine.cli import main as cli_main
from kd_engine.config import build_config


@pytest.fixture(scope="session", autouse=True)
def _single_process_env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    tiny.make_llama(str(d / "teacher"), layers=4)
    tiny.make_llama(str(d / "other_vocab"), layers=2, tokenizer_kind="bert")
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(48))
    tiny.write_lines(str(d / "eval.txt"), tiny.sentences(12, seed=1))
    tiny.make_bert_classifier(str(d / "cls_teacher"), layers=4)
    tiny.write_classification_tsv(str(d / "cls_train.tsv"), 64)
    return d


def run(argv):
    from kd_engine.engine.trainer import Trainer

    tr = Trainer(build_config(argv))
    tr.fit()
    return tr


def base_args(assets, out, *extra):
    return ["--method", "kd", "--teacher", str(assets / "teacher"), "--student.layers", "2",
            "--train_file", str(assets / "train.txt"), "--eval_file", str(assets / "eval.txt"),
            "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--disable_tqdm", "true", *extra]


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3, "2_bf16"])
def test_every_zero_stage_steps_and_teacher_stays_frozen(assets, tmp_path, stage):
    import deepspeed
    from transformers import AutoModelForCausalLM

    cfg = tmp_path / "ds.json"
    tiny.ds_config_file(cfg, stage)
    tr = run(base_args(assets, tmp_path / "out", "--deepspeed", str(cfg)))
    assert tr.global_step == 2
    log = [json.loads(line) for line in open(tmp_path / "out" / "train_log.jsonl")]
    losses = [r["loss"] for r in log if r["split"] == "train"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(r["grad_norm"] > 0 for r in log if r["split"] == "train")
    if stage == "2_bf16":  # bf16 student and, with teacher_dtype auto, a bf16 teacher
        assert tr.student_dtype == "bf16" and next(tr.teacher_model.parameters()).dtype == torch.bfloat16
    # teacher: own engine, eval mode, no grads, weights unchanged; ZeRO-3 partitioned when the student is
    teacher_ref = AutoModelForCausalLM.from_pretrained(str(assets / "teacher"))
    tm = tr.teacher_model
    assert not tm.training and all(not p.requires_grad for p in tm.parameters())
    params = list(tm.parameters())
    if stage == 3:
        assert all(hasattr(p, "ds_id") for p in params) and any(p.numel() == 0 for p in params)
    with deepspeed.zero.GatheredParameters(params) if stage == 3 else _nullctx():
        for (k, v), (k2, v2) in zip(tm.state_dict().items(), teacher_ref.state_dict().items()):
            assert torch.equal(v.float(), v2.to(v.dtype).float()), k
    # the student trained: exported weights differ from the teacher layers they were copied from
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "final"))
    assert exported.config.num_hidden_layers == 2
    assert not torch.equal(exported.model.layers[1].mlp.up_proj.weight, teacher_ref.model.layers[3].mlp.up_proj.weight)
    # teacher is not in the student's checkpoint
    ck = os.listdir(tmp_path / "out" / "checkpoints" / "step-00000002")
    assert "student" in ck and "COMPLETE" in ck and not any("teacher" in c for c in ck)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_export_reloads_and_card_and_tensorboard(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    tr = run(base_args(assets, out, "--max_steps", "3", "--eval_before_training", "true"))
    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(str(final))
    tok = AutoTokenizer.from_pretrained(str(final))
    assert model.config.kd_lineage["teacher"]  # lineage from the student builder survives
    sd = tr.student.module.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    ids = tok("the cat runs", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3
    card = (final / "README.md").read_text()
    assert str(assets / "teacher") in card and "`kd`" in card and "perplexity" in card
    assert "before training: perplexity" in card
    # the teacher's own loss and perplexity are reported beside the student's
    assert {"lm_loss", "perplexity", "teacher_lm_loss", "teacher_perplexity"} <= set(tr.final_metrics)
    assert tr.final_metrics["teacher_perplexity"] == pytest.approx(math.exp(tr.final_metrics["teacher_lm_loss"]))
    assert "before training: teacher_perplexity" in card
    # TensorBoard events hold every loss term and the throughput figures
    runs = [os.path.join(r, f) for r, _, fs in os.walk(out / "tensorboard") for f in fs if "tfevents" in f]
    assert runs
    acc = EventAccumulator(os.path.dirname(runs[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/kd", "train/ce", "train/lr", "train/samples_per_s", "train/tokens_per_s",
                "train/teacher_ms", "train/student_ms", "train/grad_norm", "eval/perplexity",
                "eval/teacher_agreement"):
        assert tag in tags, (tag, tags)
    assert len(acc.Scalars("train/loss")) == 3


def test_classification_kd_and_sft(assets, tmp_path):
    tr = run(["--method", "kd", "--teacher", str(assets / "cls_teacher"), "--student.layers", "2",
              "--train_file", str(assets / "cls_train.tsv"), "--text_column", "sentence", "--label_column", "label",
              "--eval_split", "0.25", "--output_dir", str(tmp_path / "kd"), "--max_steps", "3",
              "--per_device_train_batch_size", "8", "--disable_tqdm", "true"])
    assert tr.method.task == "sequence_classification"
    assert {"accuracy", "teacher_agreement", "kd_kl"} <= set(tr.final_metrics)
    tr2 = run(["--method", "sft", "--student", str(assets / "cls_teacher"), "--train_file",
               str(assets / "cls_train.tsv"), "--text_column", "sentence", "--label_column", "label",
               "--output_dir", str(tmp_path / "sft"), "--max_steps", "2", "--disable_tqdm", "true",
               "--eval_split", "0.25"])
    assert "accuracy" in tr2.final_metrics and tr2.teacher is None


def test_grad_accumulation_and_epoch_count(assets, tmp_path):
    tr = run(base_args(assets, tmp_path / "o", "--max_steps", "-1", "--num_train_epochs", "1",
                       "--gradient_accumulation_steps", "3"))
    # 48 examples / micro 4 = 12 micro-batches = 4 optimizer steps of 3
    assert tr.global_step == 4 and tr.sampler.epoch == 1 and tr.samples_seen == 48


def test_deepspeed_json_batch_sizes_shape_sampler_and_epoch(assets, tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}))

    def argv(out, *extra):
        return ["--method", "kd", "--teacher", str(assets / "teacher"), "--student.layers", "2",
                "--train_file", str(assets / "train.txt"), "--output_dir", str(tmp_path / out), "--num_train_epochs",
                "1", "--deepspeed", str(ds), "--disable_tqdm", "true", "--export", "false", *extra]

    tr = run(argv("a"))  # CLI defaults (micro 8, accumulation 1) give way to the JSON's explicit values
    # 48 examples / micro 2 = 24 micro-batches = 6 optimizer steps of 4 x 2 samples: one pass over the data
    assert tr.sampler.batch_size == 2 and tr.ds_config["train_batch_size"] == 8
    assert tr.global_step == 6 and tr.samples_seen == 48 and tr.sampler.epoch == 1
    # a YAML or command line that sets the same value agrees; a different value is one clear error, nothing written
    yml = tmp_path / "run.yaml"
    yml.write_text("per_device_train_batch_size: 2\ngradient_accumulation_steps: 4\nmax_steps: 1\n")
    assert run(argv("b", "--config", str(yml))).sampler.batch_size == 2
    yml.write_text("per_device_train_batch_size: 4\n")
    rc, err = _cli(capsys, argv("c", "--config", str(yml)))
    assert rc == 2 and f"per_device_train_batch_size=4 ({yml})" in err and "train_micro_batch_size_per_gpu=2" in err
    rc, err = _cli(capsys, argv("d", "--gradient_accumulation_steps", "2"))
    assert rc == 2 and "gradient_accumulation_steps=2 (the command line)" in err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


# ---- bad input: one clear message, exit 2, nothing destroyed ---------------------------------------------
def _cli(capsys, argv):
    rc = cli_main(argv)
    return rc, capsys.readouterr().err


def test_missing_and_empty_and_non_utf8_data(assets, tmp_path, capsys):
    rc, err = _cli(capsys, base_args(assets, tmp_path / "a", "--train_file", str(tmp_path / "nope.txt")))
    assert rc == 2 and "nope.txt' does not exist" in err
    (tmp_path / "empty.txt").write_text("")
    rc, err = _cli(capsys, base_args(assets, tmp_path / "b", "--train_file", str(tmp_path / "empty.txt")))
    assert rc == 2 and "empty" in err
    (tmp_path / "bad.txt").write_bytes(b"fine line\n\xff\xfe broken\n")
    rc, err = _cli(capsys, base_args(assets, tmp_path / "c", "--train_file", str(tmp_path / "bad.txt")))
    assert rc == 2 and "UTF-8" in err and "line 2" in err


def test_missing_model_and_vocab_mismatch(assets, tmp_path, capsys):
    rc, err = _cli(capsys, base_args(assets, tmp_path / "a", "--teacher", str(tmp_path / "no_model")))
    assert rc == 2 and "model path not found" in err
    rc, err = _cli(capsys, base_args(assets, tmp_path / "b", "--student", str(assets / "other_vocab")))
    assert rc == 2 and "tokenizers differ" in err


def test_output_dir_with_another_run_is_refused_and_kept(assets, tmp_path, capsys):
    out = tmp_path / "o"
    run(base_args(assets, out, "--max_steps", "1"))
    before = sorted(os.listdir(out))
    weights = (out / "final" / "model.safetensors").read_bytes()
    rc, err = _cli(capsys, base_args(assets, out, "--max_steps", "1"))
    assert rc == 2 and "already holds another kd_engine run" in err and "--resume" in err
    assert sorted(os.listdir(out)) == before and (out / "final" / "model.safetensors").read_bytes() == weights
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    rc, err = _cli(capsys, base_args(assets, foreign, "--overwrite_output_dir", "true"))
    assert rc == 2 and "not a kd_engine run" in err and (foreign / "thesis.tex").read_text() == "precious"
    rc, _ = _cli(capsys, base_args(assets, out, "--max_steps", "1", "--overwrite_output_dir", "true"))
    assert rc == 0


def test_bad_deepspeed_json_and_batch_sizes(assets, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    rc, err = _cli(capsys, base_args(assets, tmp_path / "a", "--deepspeed", str(bad)))
    assert rc == 2 and "not valid JSON" in err
    inc = tmp_path / "inc.json"
    inc.write_text(json.dumps({"train_batch_size": 7, "train_micro_batch_size_per_gpu": 4,
                               "gradient_accumulation_steps": 1}))
    rc, err = _cli(capsys, base_args(assets, tmp_path / "b", "--deepspeed", str(inc)))
    assert rc == 2 and "inconsistent batch sizes" in err
    assert not (tmp_path / "b" / "checkpoints").exists()

"""--method mate_kd end to end in-process with real DeepSpeed on CPU (tiny random BERT / RoBERTa classifiers):
schedule counts and LR schedules per model, a generator step moves only the generator, ZeRO 0-3, RoBERTa and
sequence pairs, --generator PATH, export through pipeline("text-classification"), bad input (exit 2, nothing
written). Crash/resume and 2-rank runs are in test_mate_kd_launch.py."""
from __future__ import annotations

import json
import os

import pytest
import torch

import tiny
from kd_engine.cli import main as cli_main
from kd_engine.config import build_config


@pytest.fixture(scope="module", autouse=True)
def _single_process_env(tmp_path_factory):
    with tiny.single_process_env_kept(str(tmp_path_factory.mktemp("kdcache"))):
        yield


def make_classifier(path, arch="bert", layers=4, seed=0, num_labels=2, vocab_size=None):
    """A tiny classifier with a wide init (initializer_range 0.5) so that its logits depend on the input."""
    from transformers import (BertConfig, BertForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size or tiny.vocab_size(), hidden_size=32, intermediate_size=64,
                  num_hidden_layers=layers, num_attention_heads=4, num_labels=num_labels, initializer_range=0.5,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if arch == "bert":
        model = BertForSequenceClassification(BertConfig(max_position_embeddings=128, **common))
    else:
        model = RobertaForSequenceClassification(RobertaConfig(max_position_embeddings=130, pad_token_id=0, **common))
    model.save_pretrained(path)
    tiny.make_tokenizer(path, "bert")
    return model


def write_pairs(path, n, seed=0):
    a, b = tiny.sentences(n, seed), tiny.sentences(n, seed + 7)
    rows = ["premise\thypothesis\tlabel"] + [f"{x}\t{y}\t{int(len(x) > len(y))}" for x, y in zip(a, b)]
    return tiny.write_lines(path, rows)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("mate_assets")
    make_classifier(str(d / "teacher"))
    make_classifier(str(d / "roberta"), arch="roberta")
    tiny.write_classification_tsv(str(d / "train.tsv"), 64)
    tiny.write_classification_tsv(str(d / "eval.tsv"), 16, seed=1)
    write_pairs(str(d / "pairs.tsv"), 48)
    tiny.write_lines(str(d / "corpus.txt"), tiny.sentences(300, seed=5))
    return d


def args(assets, out, *extra, teacher="teacher"):
    return ["--method", "mate_kd", "--teacher", str(assets / teacher), "--student.layers", "2",
            "--generator.layers", "1", "--train_file", str(assets / "train.tsv"), "--eval_file",
            str(assets / "eval.tsv"), "--text_column", "sentence", "--label_column", "label", "--max_length", "32",
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--generator_lr", "1e-2", "--generator_steps", "2", "--student_steps", "3", "--max_steps", "5",
            "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none", *extra]


def run(argv, spy=None):
    from kd_engine.engine.trainer import Trainer

    tr = Trainer(build_config(argv))
    if spy is not None:
        spy(tr)
    tr.fit()
    return tr


def mate_log(out):
    return [json.loads(x) for x in open(os.path.join(out, "train_log.jsonl")) if '"split": "mate"' in x]


def test_schedule_counts_and_per_model_lr_schedules(assets, tmp_path):
    """10:100 by default: steps 0-9 are generator steps, 10-109 student steps; each LR schedule counts only its own
    model's steps, so both linear schedules reach 0 exactly at the end (the reference's student schedule would
    stop at 10/110 of the peak)."""
    from kd_engine.methods.mate_kd import schedule_counts

    seen = {"generator": [], "student": []}

    def spy(tr):
        m = tr.method
        for kind in seen:
            orig = getattr(m, f"{kind}_step")
            setattr(m, f"{kind}_step", lambda ctx, orig=orig, kind=kind: (seen[kind].append(ctx.global_step),
                                                                          orig(ctx))[1])

    a = [x for x in args(assets, tmp_path / "o") if x not in ()]
    for k in ("--generator_steps", "--student_steps", "--max_steps"):
        i = a.index(k)
        del a[i:i + 2]
    tr = run(a + ["--max_steps", "110", "--warmup_steps", "5", "--logging_steps", "50"], spy)
    assert seen["generator"] == list(range(10)) and seen["student"] == list(range(10, 110))
    gen, student = tr.engines["generator"], tr.student
    assert gen.global_steps == 10 and student.global_steps == 100
    assert gen.lr_scheduler.last_epoch == 10 and student.lr_scheduler.last_epoch == 100
    assert gen.get_lr()[0] == 0.0 and student.get_lr()[0] == 0.0
    log = mate_log(tmp_path / "o")
    assert [r["step_type_generator"] for r in log] == [1.0] * 10 + [0.0] * 100
    # lr after each step: 0 through the generator steps, warmup over the first 5 student steps (peak after global
    # step 14), then linear decay over the remaining 95 student steps to 0 after the last one
    lrs = {r["step"]: r["student_lr"] for r in log}
    assert all(lrs[i] == 0.0 for i in range(10))
    assert lrs[10] == pytest.approx(0.2e-3) and lrs[14] == pytest.approx(1e-3)
    assert lrs[15] == pytest.approx(1e-3 * 94 / 95) and lrs[109] == 0.0
    assert schedule_counts(110, 10, 100) == (10, 100) and schedule_counts(115, 10, 100) == (15, 100)
    assert schedule_counts(125, 10, 100) == (20, 105) and schedule_counts(5, 10, 100) == (5, 0)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(a, b):
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_generator_step_moves_only_the_generator(assets, tmp_path):
    """A generator step (through the frozen student and teacher) changes the generator only; a student step changes
    the student only; D > 0 and some tokens get replaced."""
    record = []

    def spy(tr):
        m = tr.method
        orig_train_step = m.train_step

        def train_step(ctx):
            before = [_snapshot(x) for x in (ctx.student.module, m.gen.module, ctx.teacher_module)]
            out = orig_train_step(ctx)
            after = [_snapshot(x) for x in (ctx.student.module, m.gen.module, ctx.teacher_module)]
            record.append((m.is_generator_step(ctx.global_step), [bool(_changed(b, a)) for b, a in zip(before, after)],
                           out))
            return out

        m.train_step = train_step

    run(args(assets, tmp_path / "o"), spy)
    kinds = [r[0] for r in record]
    assert kinds == [True, True, False, False, False]
    for is_gen, (student_moved, gen_moved, teacher_moved), out in record:
        assert not teacher_moved
        assert (student_moved, gen_moved) == ((False, True) if is_gen else (True, False))
        assert 0 < out["changed_fraction"] <= 1
        if is_gen:
            assert out["generator_D"] > 1e-4
        else:
            assert {"ce", "adv", "kd", "loss"} <= set(out) and out["adv"] > 0


@pytest.mark.parametrize("ds", ["zero1.json", "zero2.json", "zero3.json", "zero2_bf16.json"])
def test_zero_stages(assets, tmp_path, ds):
    tr = run(args(assets, tmp_path / "o", "--deepspeed", f"ds_configs/{ds}"))
    log = mate_log(tmp_path / "o")
    gen_d = [r["generator_generator_D"] for r in log if r["step_type_generator"] == 1.0]
    adv = [r["student_adv"] for r in log if r["step_type_generator"] == 0.0]
    assert len(gen_d) == 2 and len(adv) == 3
    assert all(torch.isfinite(torch.tensor(x)) for x in gen_d + adv) and max(gen_d) > 1e-4
    assert tr.engines["generator"].global_steps == 2 and tr.student.global_steps == 3
    assert os.path.isfile(tmp_path / "o" / "final" / "model.safetensors")


def test_roberta_pairs_given_generator_and_export_pipeline(assets, tmp_path):
    """RoBERTa teacher/student (padding-offset position ids), sequence pairs (MNLI-style), a --generator folder,
    MLM warm-up through the corpus cache; the export loads with pipeline("text-classification")."""
    from transformers import pipeline

    from kd_engine.models.generator import build_from_teacher
    from transformers import AutoModelForSequenceClassification

    gen_dir = tmp_path / "gen"
    build_from_teacher(AutoModelForSequenceClassification.from_pretrained(assets / "roberta"), 2).save_pretrained(gen_dir)
    tiny.make_tokenizer(str(gen_dir), "bert")
    a = args(assets, tmp_path / "o", "--train_file", str(assets / "pairs.tsv"), "--text_column", "premise",
             "--text_pair_column", "hypothesis", "--eval_file", str(assets / "pairs.tsv"),
             "--max_eval_samples", "8", "--generator_warmup_steps", "3", "--generator_corpus",
             str(assets / "corpus.txt"), teacher="roberta")
    i = a.index("--generator.layers")
    a[i:i + 2] = ["--generator", str(gen_dir)]
    tr = run(a)
    assert type(tr.engines["generator"].module).__name__ == "RobertaForMaskedLM"
    assert "masked-LM warm-up 3 steps" in tr.method.generator_source
    assert {"accuracy", "teacher_agreement"} <= set(tr.final_metrics)
    clf = pipeline("text-classification", model=str(tmp_path / "o" / "final"), device=-1)
    out = clf([{"text": "the cat runs", "text_pair": "a dog sleeps"}, "good red house"])
    assert len(out) == 2 and all(r["label"] in ("LABEL_0", "LABEL_1") for r in out)
    card = open(tmp_path / "o" / "final" / "README.md").read()
    assert "mate_kd" in card and "generator" in card


# ---- bad input: one clear message, exit 2, nothing written ---------------------------------------------------
@pytest.fixture(scope="module")
def bad_assets(assets, tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM

    d = tmp_path_factory.mktemp("mate_bad")
    make_classifier(str(d / "big_vocab_teacher"), vocab_size=tiny.vocab_size() + 20)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=tiny.vocab_size() + 8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=4)).save_pretrained(d / "other_gen")
    other = tiny.make_tokenizer(str(d / "other_gen"), "bert")
    other.add_tokens([f"extra{i}" for i in range(8)])
    other.save_pretrained(d / "other_gen")
    make_classifier(str(d / "no_mask"))
    tiny.make_tokenizer(str(d / "no_mask"), "causal")  # a tokenizer without a mask token
    return d


@pytest.mark.parametrize("case", ["gen_vocab", "gen_no_mlm_head", "no_mask_token", "mask_prob", "zero_student",
                                  "no_labels", "two_generators", "warmup_no_corpus", "too_few_steps"])
def test_bad_input_exits_2_and_writes_nothing(assets, bad_assets, tmp_path, capsys, case):
    out = tmp_path / "o"
    a = args(assets, out)
    gen_i = a.index("--generator.layers")
    expect = {
        "gen_vocab": "vocabularies differ",
        "gen_no_mlm_head": "no masked-LM head",
        "no_mask_token": "no mask token",
        "mask_prob": "mask_prob must be in (0, 1)",
        "zero_student": "student_steps must be >= 1",
        "no_labels": "no labels",
        "two_generators": "exactly one of --generator",
        "warmup_no_corpus": "needs --generator_corpus",
        "too_few_steps": "holds no student step",
    }[case]
    if case == "gen_vocab":
        a[gen_i:gen_i + 2] = ["--generator", str(bad_assets / "other_gen")]
    elif case == "gen_no_mlm_head":
        a[gen_i:gen_i + 2] = ["--generator", str(assets / "teacher")]
    elif case == "no_mask_token":
        a[a.index("--teacher") + 1] = str(bad_assets / "no_mask")
    elif case == "mask_prob":
        a += ["--mask_prob", "1.5"]
    elif case == "zero_student":
        a += ["--student_steps", "0"]
    elif case == "no_labels":
        i = a.index("--label_column")
        del a[i:i + 2]
    elif case == "two_generators":
        a += ["--generator", str(bad_assets / "other_gen")]
    elif case == "warmup_no_corpus":
        a += ["--generator_warmup_steps", "5"]
    elif case == "too_few_steps":
        a += ["--max_steps", "2"]
    rc = cli_main(a)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.strip().splitlines()[-1].startswith("error: ") and expect in err, err
    assert not out.exists()


def test_generator_vocab_rows_differ_from_teacher(assets, bad_assets, tmp_path, capsys):
    """A generator folder without a tokenizer whose embedding rows differ from the teacher's."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=tiny.vocab_size() + 3, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=4)).save_pretrained(tmp_path / "g")
    a = args(assets, tmp_path / "o")
    i = a.index("--generator.layers")
    a[i:i + 2] = ["--generator", str(tmp_path / "g")]
    rc = cli_main(a)
    err = capsys.readouterr().err
    assert rc == 2 and "vocabularies differ" in err and not (tmp_path / "o").exists()


def test_bare_encoder_student_gets_a_head_with_the_teachers_labels(assets, tmp_path):
    """--student FOLDER that is no classifier (e.g. distilroberta-base): a fresh head with the teacher's classes."""
    from transformers import AutoModelForSequenceClassification

    from kd_engine.models.generator import build_from_teacher

    build_from_teacher(AutoModelForSequenceClassification.from_pretrained(assets / "teacher"), 2).save_pretrained(
        tmp_path / "mlm")
    tiny.make_tokenizer(str(tmp_path / "mlm"), "bert")
    a = args(assets, tmp_path / "o")
    i = a.index("--student.layers")
    a[i:i + 2] = ["--student", str(tmp_path / "mlm")]
    tr = run(a)
    model = tr.student.module
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 2
    assert model.config.label2id == AutoModelForSequenceClassification.from_pretrained(
        assets / "teacher").config.label2id


def test_regression_teacher_uses_mse(assets, tmp_path):
    """STS-B style: a one-output teacher, float scores, sentence pairs; D is MSE on the logits, CE is MSE on the
    scores; a non-numeric score is a clear error."""
    from kd_engine.errors import KDError

    make_classifier(str(tmp_path / "reg"), num_labels=1)
    a, b = tiny.sentences(40, 1), tiny.sentences(40, 2)
    tiny.write_lines(str(tmp_path / "sts.tsv"), ["s1\ts2\tscore"] + [f"{x}\t{y}\t{(len(x) % 50) / 10:.2f}"
                                                                     for x, y in zip(a, b)] + ["\tempty first\t1.0"])
    argv = args(assets, tmp_path / "o", "--train_file", str(tmp_path / "sts.tsv"), "--eval_file",
                str(tmp_path / "sts.tsv"), "--text_column", "s1", "--text_pair_column", "s2", "--label_column",
                "score")
    argv[argv.index("--teacher") + 1] = str(tmp_path / "reg")
    tr = run(argv)
    assert tr.method.kind == "mse" and len(tr.data.train) == 40  # the row without a first text is dropped
    assert tr.data.train[0]["labels"] == pytest.approx((len(a[0]) % 50) / 10)
    assert {"mse", "teacher_mse"} <= set(tr.final_metrics) and tr.final_metrics["mse"] > 0
    gen_d = [r["generator_generator_D"] for r in mate_log(tmp_path / "o") if r["step_type_generator"] == 1.0]
    assert len(gen_d) == 2 and max(gen_d) > 0
    tiny.write_lines(str(tmp_path / "bad.tsv"), ["s1\ts2\tscore", "a cat\ta dog\thigh"])
    argv2 = argv + ["--train_file", str(tmp_path / "bad.tsv"), "--output_dir", str(tmp_path / "o2")]  # last wins
    with pytest.raises(KDError, match="is not a number"):
        run(argv2)


def test_deepspeed_json_scheduler_counts_student_steps_only(assets, tmp_path):
    """A scheduler named in the DeepSpeed JSON (WarmupDecayLR, total "auto") also runs over the student steps only:
    10 global steps = 6 student steps, so total_num_steps is 6 and the lr after the last student step (DeepSpeed's
    iteration 5) is (6 - 5) / (6 - 2) of the peak, not (10 - 5) / (10 - 2)."""
    ds = json.load(open("ds_configs/zero0.json"))
    ds["scheduler"] = {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                                                           "warmup_max_lr": "auto", "warmup_min_lr": 0}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    tr = run(args(assets, tmp_path / "o", "--deepspeed", str(tmp_path / "ds.json"), "--warmup_steps", "2",
                  "--max_steps", "10"))
    assert type(tr.student.lr_scheduler).__name__ == "WarmupDecayLR"
    assert tr.student.lr_scheduler.total_num_steps == 6 and tr.student.lr_scheduler.last_batch_iteration == 5
    lrs = [r["student_lr"] for r in mate_log(tmp_path / "o")]
    assert lrs[-1] == pytest.approx(1e-3 * 1 / 4)


def test_padded_vocab_rows_are_never_sampled_end_to_end(assets, bad_assets, tmp_path):
    """A teacher (hence student and generator) with 20 padded embedding rows beyond the tokenizer trains, and no
    perturbed text ever holds an id >= len(tokenizer)."""
    seen = []

    def spy(tr):
        m = tr.method
        orig = m._sample

        def sample(batch, rng, with_grad):
            out = orig(batch, rng, with_grad)
            seen.append(int(out[2].max()))
            return out

        m._sample = sample

    a = args(assets, tmp_path / "o")
    a[a.index("--teacher") + 1] = str(bad_assets / "big_vocab_teacher")
    tr = run(a, spy)
    assert tr.method.gen.module.get_output_embeddings().weight.shape[0] == tiny.vocab_size() + 20
    assert len(seen) == 5 and max(seen) < tiny.vocab_size()


def test_tensorboard_holds_the_per_step_mate_scalars(assets, tmp_path):
    """Step type, both learning rates, the student's terms, the generator's D and the changed fraction reach
    TensorBoard (through the DeepSpeed monitor), one point per step of each kind."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a = args(assets, tmp_path / "o")
    a[a.index("--report_to") + 1] = "tensorboard"
    run(a)
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "o" / "tensorboard") for f in fs
             if f.startswith("events")]
    assert files
    tags, points = set(), {}
    for f in files:
        acc = EventAccumulator(f)
        acc.Reload()
        for t in acc.Tags()["scalars"]:
            tags.add(t)
            points[t] = points.get(t, 0) + len(acc.Scalars(t))
    want = {"mate/step_type_generator": 5, "mate/generator_lr": 5, "mate/student_lr": 5,
            "mate/generator_generator_D": 2, "mate/generator_changed_fraction": 2, "mate/student_ce": 3,
            "mate/student_adv": 3, "mate/student_kd": 3, "mate/student_changed_fraction": 3}
    assert {t: points.get(t) for t in want} == want, sorted(tags)

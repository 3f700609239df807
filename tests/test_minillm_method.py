"""The minillm plugin end to end on a tiny random Llama with real DeepSpeed on CPU (one process)."""
import json
import os

import pytest
import torch

import tiny
from kd_engine.config import build_config
from kd_engine.dist import free_port


@pytest.fixture(scope="module", autouse=True)
def _single_process_env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("minillm_assets")
    tiny.make_llama(str(d / "teacher"), layers=2)
    with open(d / "prompts.jsonl", "w") as f:
        for s in tiny.sentences(16, seed=3):
            f.write(json.dumps({"text": s, "answer": s.split()[-1]}) + "\n")
    tiny.write_lines(str(d / "pt.txt"), tiny.sentences(16, seed=4))
    return d


def _run(argv):
    from kd_engine.engine.trainer import Trainer

    tr = Trainer(build_config(argv))
    tr.fit()
    return tr


@pytest.mark.parametrize("stage", [0, pytest.param(3, marks=pytest.mark.slow)])
def test_minillm_trains_with_rollouts_ppo_and_pt(assets, tmp_path, stage):
    cfg = tmp_path / "ds.json"
    tiny.ds_config_file(cfg, stage)
    out = tmp_path / "out"
    tr = _run(["--method", "minillm", "--teacher", str(assets / "teacher"), "--student.layers", "1",
               "--train_file", str(assets / "prompts.jsonl"), "--eval_file", str(assets / "prompts.jsonl"),
               "--max_eval_samples", "4", "--pt_file", str(assets / "pt.txt"), "--output_dir", str(out),
               "--max_steps", "3", "--per_device_train_batch_size", "2", "--num_rollouts", "4", "--ppo_epochs", "2",
               "--max_new_tokens", "6", "--learning_rate", "1e-3", "--logging_steps", "1", "--disable_tqdm", "true",
               "--deepspeed", str(cfg), "--target_column", "answer"])
    assert tr.global_step == 3
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    train = [r for r in log if r["split"] == "train"]
    for key in ("pg", "reg", "pt", "pt_lm", "pt_kd", "reward", "response_len", "rev_kl", "ratio", "loss"):
        assert all(key in r and torch.isfinite(torch.tensor(r[key])) for r in train), key
    # 4 rollouts / batch 2 = 2 minibatches per PPO epoch; 2 epochs -> steps 1-3 use one buffer: ratio starts at w
    assert tr.method.round == 1
    assert len(tr.data.eval) == 4  # --max_eval_samples applies to the prompt files
    assert train[0]["approx_kl"] == 0.0  # first minibatch of a fresh buffer: log q_new == log q_old, ratio == w
    ev = [r for r in log if r["split"] == "eval"]
    assert ev and "rev_kl" in ev[-1]
    for key in ("answer_accuracy", "teacher_answer_accuracy", "teacher_agreement"):
        assert 0.0 <= ev[-1][key] <= 1.0, key


def test_minillm_resumes_exactly_in_the_middle_of_a_rollout_round(assets, tmp_path):
    """The rollout buffer and the PPO position are per-rank checkpoint state: stop after step 2 of a 4-minibatch
    round, resume, and steps 3-5 (rest of the round + a new round) match a straight run."""
    def argv(out, steps, *extra):
        return ["--method", "minillm", "--teacher", str(assets / "teacher"), "--student.layers", "1",
                "--train_file", str(assets / "prompts.jsonl"), "--pt_file", str(assets / "pt.txt"),
                "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "2",
                "--num_rollouts", "4", "--ppo_epochs", "2", "--max_new_tokens", "5", "--learning_rate", "1e-3",
                "--lr_scheduler_type", "constant", "--logging_steps", "1", "--disable_tqdm", "true",
                "--target_column", "answer", *extra]

    def losses(out):
        rows = [json.loads(x) for x in open(out / "train_log.jsonl")]
        return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}

    a = _run(argv(tmp_path / "a", 5))
    _run(argv(tmp_path / "b", 2))
    b = _run(argv(tmp_path / "b", 5, "--resume"))
    assert b.method.round == a.method.round == 2
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [la[s] for s in range(1, 6)] == [lb[s] for s in range(1, 6)]
    sa, sb = a.student.module.state_dict(), b.student.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _t5_teacher(d, extra_ids: int = 0):
    """Tiny random T5 with a SentencePiece tokenizer trained here (60 tokens + ``extra_ids`` sentinels; 64 logit
    rows like Flan-T5's padding)."""
    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    tiny.write_lines(str(d / "spm.txt"), tiny.sentences(200, seed=5))
    (d / "t5").mkdir()
    spm.SentencePieceTrainer.train(input=str(d / "spm.txt"), model_prefix=str(d / "t5" / "spiece"), vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    tok = T5Tokenizer.from_pretrained(str(d / "t5"), extra_ids=extra_ids)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(cfg).save_pretrained(str(d / "t5"))
    tok.save_pretrained(str(d / "t5"))
    return d / "t5"


def test_minillm_encoder_decoder_t5(assets, tmp_path):
    teacher = _t5_teacher(tmp_path)
    out = tmp_path / "out"
    tr = _run(["--method", "minillm", "--teacher", str(teacher), "--student.layers", "1",
               "--train_file", str(assets / "prompts.jsonl"), "--eval_file", str(assets / "prompts.jsonl"),
               "--max_eval_samples", "4", "--output_dir", str(out), "--max_steps", "2",
               "--per_device_train_batch_size", "2", "--num_rollouts", "4", "--ppo_epochs", "1",
               "--max_new_tokens", "5", "--max_prompt_length", "8", "--learning_rate", "1e-3", "--logging_steps", "1",
               "--disable_tqdm", "true", "--pt_file", str(assets / "pt.txt")])
    assert tr.global_step == 2
    assert tr.method.vocab_size == 60 and tr.student.module.config.vocab_size == 64
    assert tr.data.info["truncated_prompts"] > 0  # prompts longer than 8 tokens were cut from the left
    train = [json.loads(line) for line in open(out / "train_log.jsonl")]
    for key in ("pg", "reg", "reward", "response_len", "rev_kl", "pt", "pt_lm", "pt_kd"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in train if r["split"] == "train"), key
    assert [r for r in train if r["split"] == "train"][0]["approx_kl"] == 0.0
    assert tr.method.pt_objective == "prefix_lm"  # auto: this tokenizer has no <extra_id_*> sentinels


def _t5_argv(teacher, assets, out, *extra):
    return ["--method", "minillm", "--teacher", str(teacher), "--student.layers", "1",
            "--train_file", str(assets / "prompts.jsonl"), "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--num_rollouts", "2", "--ppo_epochs", "1", "--max_new_tokens", "3",
            "--max_prompt_length", "8", "--logging_steps", "1", "--disable_tqdm", "true", "--pt_file",
            str(assets / "pt.txt"), "--pt_max_length", "24", *extra]


def test_minillm_t5_span_corruption_pt_term(assets, tmp_path):
    """A T5 tokenizer with sentinels: the pt term is T5's span corruption (auto), inputs carry <extra_id_i> where
    spans were cut, the decoder targets list each sentinel and its span, and together they rebuild the text."""
    from kd_engine.errors import KDError

    teacher = _t5_teacher(tmp_path, extra_ids=4)
    tr = _run(_t5_argv(teacher, assets, tmp_path / "out"))
    m = tr.method
    assert m.pt_objective == "span_corruption" and len(m.sentinels) == 4
    train = [json.loads(line) for line in open(tmp_path / "out" / "train_log.jsonl")]
    assert all(torch.isfinite(torch.tensor(r["pt"])) for r in train if r["split"] == "train")
    inputs, labels = m._pt_batch(tr)
    eos, pad = tr.tokenizer.eos_token_id, tr.tokenizer.pad_token_id
    for inp, lab in zip(inputs["input_ids"].tolist(), labels.tolist()):
        lab = [t for t in lab if t != -100]
        inp = [t for t in inp if t != pad]
        assert lab[0] == m.sentinels[0] and inp.count(m.sentinels[0]) == 1 and lab[-1] == eos == inp[-1]
        spans, cur = {}, None
        for t in lab[:-1]:
            if t in m.sentinels:
                cur = spans.setdefault(t, [])
            else:
                cur.append(t)
        rebuilt = [x for t in inp[:-1] for x in (spans[t] if t in m.sentinels else [t])]
        assert rebuilt in [list(m.pt[i]["input_ids"])[:-1] for i in range(len(m.pt))]
    # decoder inputs = start token + labels shifted right (no doubled start token)
    assert inputs["decoder_input_ids"][0, 0] == tr.student.module.config.decoder_start_token_id
    assert inputs["decoder_input_ids"][0, 1] == labels[0, 0]
    # a tokenizer without sentinels: span corruption asked for explicitly is a clear error
    bare = tmp_path / "bare"
    bare.mkdir()
    t0 = _t5_teacher(bare)
    with pytest.raises(KDError, match="extra_id_0"):
        _run(_t5_argv(t0, assets, tmp_path / "out2", "--pt_objective", "span_corruption"))


@pytest.mark.slow
@pytest.mark.multirank
def test_minillm_two_ranks_zero3_torchrun(assets, tmp_path):
    import subprocess
    import sys

    tiny.ds_config_file(tmp_path / "z3.json")
    out = tmp_path / "out"
    env = tiny.cpu_env({"KD_ENGINE_CACHE": str(tmp_path / "cache")})
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "launch/train.py",
           "--method", "minillm", "--teacher", str(assets / "teacher"), "--student.layers", "1",
           "--train_file", str(assets / "prompts.jsonl"), "--eval_file", str(assets / "prompts.jsonl"),
           "--max_eval_samples", "4", "--pt_file", str(assets / "pt.txt"), "--output_dir", str(out),
           "--max_steps", "2", "--per_device_train_batch_size", "2", "--num_rollouts", "2", "--ppo_epochs", "1",
           "--max_new_tokens", "5", "--logging_steps", "1", "--disable_tqdm", "true", "--deepspeed",
           str(tmp_path / "z3.json"), "--target_column", "answer"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    train = [json.loads(line) for line in open(out / "train_log.jsonl")]
    train = [r for r in train if r["split"] == "train"]
    assert len(train) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert (out / "final" / "model.safetensors").exists()
    ev = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert "teacher_agreement" in [r for r in ev if r["split"] == "eval"][-1]


def test_minillm_bad_inputs_are_clear_errors(assets, tmp_path):
    from kd_engine.errors import ConfigError, KDError

    with pytest.raises(ConfigError, match="teacher_mixed_alpha"):
        build_config(["--method", "minillm", "--teacher", str(assets / "teacher"), "--teacher_mixed_alpha", "1.5"])
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "  "}) + "\n" + json.dumps({"text": ""}) + "\n")
    base = ["--method", "minillm", "--teacher", str(assets / "teacher"), "--student.layers", "1",
            "--max_steps", "1", "--disable_tqdm", "true"]
    with pytest.raises(KDError, match="no non-empty prompts"):
        _run(base + ["--train_file", str(blank), "--output_dir", str(tmp_path / "o1")])
    t5 = _t5_teacher(tmp_path)  # a seq2seq teacher with a causal student
    with pytest.raises(KDError, match="encoder-decoder|has no seq2seq_lm head"):
        _run(["--method", "minillm", "--teacher", str(t5), "--student.name_or_path", str(assets / "teacher"),
              "--train_file", str(assets / "prompts.jsonl"), "--output_dir", str(tmp_path / "o2"), "--max_steps", "1",
              "--disable_tqdm", "true"])


def test_minillm_student_equal_to_teacher_gives_zero_terms_end_to_end(assets, tmp_path):
    out = tmp_path / "out"
    _run(["--method", "minillm", "--teacher", str(assets / "teacher"), "--student.layers", "2",  # full copy
          "--train_file", str(assets / "prompts.jsonl"), "--eval_file", str(assets / "prompts.jsonl"),
          "--max_eval_samples", "4", "--target_column", "answer", "--output_dir", str(out), "--max_steps", "2",
          "--per_device_train_batch_size", "2", "--num_rollouts", "2", "--ppo_epochs", "1", "--max_new_tokens", "6",
          "--learning_rate", "0", "--logging_steps", "1", "--disable_tqdm", "true"])
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    for r in [r for r in log if r["split"] == "train"]:
        assert r["pg"] == 0.0 and abs(r["reg"]) < 1e-6 and abs(r["reward"]) < 1e-5 and abs(r["rev_kl"]) < 1e-6
        assert abs(r["ratio"] - 1.0) < 1e-5  # w == 1 when the teacher is the student
    ev = [r for r in log if r["split"] == "eval"][-1]
    assert ev["teacher_agreement"] == 1.0 and abs(ev["rev_kl"]) < 1e-6


def test_anli_prompt_conversion(tmp_path):
    import subprocess
    import sys

    src = "../shared/data/anli/R1/dev.jsonl"
    if not os.path.exists(src):
        pytest.skip(f"{src} is absent (real ANLI data lives in the shared data folder)")
    out = tmp_path / "p.jsonl"
    res = subprocess.run([sys.executable, "scripts/anli_prompts.py", src, "--out", str(out), "--with_reason"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in open(out)]
    raw = [json.loads(line) for line in open(src)]
    assert len(rows) == len(raw) == 1000
    assert {r["label"] for r in rows} == {"entailment", "contradiction", "neutral"}
    r0, s0 = rows[0], raw[0]
    assert r0["text"].startswith(s0["context"].strip()) and "\nCan we infer the following and why?\n" in r0["text"]
    assert r0["text"].endswith("OPTIONS:\n- entailment\n- contradiction\n- neutral")
    assert r0["answer"].startswith(r0["label"]) and s0["reason"].strip() in r0["answer"]
    # causal-LM form: the prompt ends with the cue, the answer follows after a space
    res = subprocess.run([sys.executable, "scripts/anli_prompts.py", src, "--out", str(out), "--answer_cue",
                          "\\nAnswer:"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    r0 = json.loads(open(out).readline())
    assert r0["text"].endswith("- neutral\nAnswer:") and r0["answer"] == " " + r0["label"]
    # instruction-tuned models: the prompt becomes the user turn of the model's chat template
    from transformers import AutoTokenizer

    tiny.make_tokenizer(str(tmp_path / "tok"), "causal")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(str(tmp_path / "tok"))
    res = subprocess.run([sys.executable, "scripts/anli_prompts.py", src, "--out", str(out), "--answer_cue",
                          "\\nOne word.", "--chat_template", str(tmp_path / "tok")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    r0 = json.loads(open(out).readline())
    assert r0["text"].startswith("<|user|>" + s0["context"].strip())
    assert r0["text"].endswith("- neutral\nOne word.</s><|assistant|>") and r0["answer"] == r0["label"]


def test_first_word_normalisation():
    from kd_engine.methods.minillm import first_word

    assert first_word("\n Contradiction. Because the text") == "contradiction"
    assert first_word("entailment") == "entailment" and first_word(" 42 -") == ""

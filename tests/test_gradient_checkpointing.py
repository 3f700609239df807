"""--gradient_checkpointing: transformers' non-reentrant checkpointing on the student, at ZeRO 0-3 with the fused KD
loss, exact resume, generation keeps its KV cache; --attn_implementation on both models; bad input."""
import json

import pytest
import torch

import tiny
from kd_engine.cli import main as cli_main


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("gc")
    tiny.make_llama(str(d / "teacher"), layers=3)
    tiny.make_llama(str(d / "dropout_student"), layers=2, seed=3, dropout=0.2)
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(48, seed=2))
    tiny.write_lines(str(d / "eval.txt"), tiny.sentences(8, seed=9))
    from transformers import JetMoeConfig, JetMoeForCausalLM

    cfg = JetMoeConfig(vocab_size=tiny.vocab_size(), hidden_size=32, num_hidden_layers=1, num_key_value_heads=2,
                       kv_channels=8, intermediate_size=32, num_local_experts=2, num_experts_per_tok=1,
                       pad_token_id=0, bos_token_id=5, eos_token_id=6)
    JetMoeForCausalLM(cfg).save_pretrained(str(d / "jetmoe"))  # transformers: supports_gradient_checkpointing False
    tiny.make_tokenizer(str(d / "jetmoe"))
    return d


def _args(d, out, *extra):
    return ["--method", "kd", "--teacher", str(d / "teacher"), "--student.layers", "2", "--train_file",
            str(d / "train.txt"), "--eval_file", str(d / "eval.txt"), "--output_dir", str(out), "--max_steps", "4",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
            "--logging_steps", "1", "--disable_tqdm", "true", "--temperature", "1", *extra]


def _losses(out):
    return [json.loads(x)["loss"] for x in open(out / "train_log.jsonl") if json.loads(x)["split"] == "train"]


def _trainer(argv):
    from kd_engine.config import build_config
    from kd_engine.engine.trainer import Trainer

    tr = Trainer(build_config(argv))
    tr.fit()
    return tr


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_checkpointed_student_trains_as_the_plain_one(assets, tmp_path, stage):
    ds = tiny.ds_config_file(tmp_path / "ds.json", stage)
    plain = _trainer(_args(assets, tmp_path / "plain", "--deepspeed", ds))
    ckpt = _trainer(_args(assets, tmp_path / "ckpt", "--deepspeed", ds, "--gradient_checkpointing", "true"))
    assert ckpt.student.module.is_gradient_checkpointing and not plain.student.module.is_gradient_checkpointing
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "ckpt")
    assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    # the export generates with the KV cache again (training ran with use_cache off)
    cfg = json.load(open(tmp_path / "ckpt" / "final" / "config.json"))
    assert cfg.get("use_cache", True) is True


def test_checkpointed_dropout_student_resumes_bit_exactly(assets, tmp_path):
    """Dropout on: the recompute replays the same dropout masks (non-reentrant checkpointing keeps the RNG state)
    and a resumed run continues exactly as a straight one."""
    args = ["--student", str(assets / "dropout_student"), "--gradient_checkpointing", "true", "--export", "false"]
    straight = tmp_path / "straight"
    assert cli_main(_args(assets, straight, *args)) == 0
    part = tmp_path / "part"
    assert cli_main(_args(assets, part, *args, "--max_steps", "2")) == 0
    assert cli_main(_args(assets, part, *args, "--resume")) == 0
    assert _losses(part) == _losses(straight)


def test_generation_keeps_the_kv_cache_under_checkpointing(assets):
    """The sampler runs the student in eval mode: with checkpointing enabled, each step after the prompt feeds one
    token (the cache is used) and the tokens equal the full-recompute reference."""
    from kd_engine.models.attention import enable_gradient_checkpointing
    from kd_engine.models.loading import load_model
    from kd_engine.models.sampling import mixed_sample

    model = load_model(str(assets / "teacher"), "causal_lm")
    enable_gradient_checkpointing(model)
    model.train()
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    ids = torch.tensor([[0, 0, 5, 9, 11], [5, 12, 13, 14, 15]])
    mask = (ids != 0).long()
    kw = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0, alpha=0.0, do_sample=True)
    cached = mixed_sample(model, None, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    hook.remove()
    full = mixed_sample(model, None, ids, mask, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    assert seen[0] == 5 and set(seen[1:]) == {1}, seen
    assert torch.equal(cached.response_ids, full.response_ids)
    assert model.training  # mode given back


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_reaches_both_models(assets, tmp_path, impl):
    tr = _trainer(_args(assets, tmp_path / impl, "--attn_implementation", impl, "--max_steps", "1"))
    assert tr.student.module.config._attn_implementation == impl
    assert tr.teacher_model.config._attn_implementation == impl
    # the teacher stores no activations: its forward runs under inference_mode (grad=True: MATE-KD's generator step)
    x = torch.tensor([[5, 9, 10, 11]])
    assert tr.teacher_forward(input_ids=x).logits.is_inference()
    out = tr.teacher_forward(grad=True, input_ids=x).logits
    assert not out.is_inference() and not any(p.requires_grad for p in tr.teacher_model.parameters())


BAD = [
    ("flash-attn missing", ["--attn_implementation", "flash_attention_2"], "needs the flash-attn package"),
    ("unknown attention", ["--attn_implementation", "fast"], "attn_implementation must be one of"),
    ("model without checkpointing", ["--student", "{d}/jetmoe", "--gradient_checkpointing", "true"],
     "does not support activation checkpointing"),
]


@pytest.mark.parametrize("name,extra,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_options_are_one_error_and_write_nothing(assets, tmp_path, capsys, name, extra, needle):
    import importlib.util

    if name == "flash-attn missing" and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    out = tmp_path / "run"
    argv = _args(assets, out, *[e.replace("{d}", str(assets)) for e in extra])
    if "--student" in extra:  # a student given by path: drop --student.layers
        i = argv.index("--student.layers")
        argv[i:i + 2] = []
    rc = cli_main(argv)
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("method", ["gkd", "minillm"])
def test_on_policy_methods_sample_and_train_the_same_with_checkpointing(assets, tmp_path, method):
    """gkd (lmbda 1: every micro-batch sampled by the student) and minillm (rollouts, PPO) with checkpointing on:
    the same samples and the same losses as without, step by step (ZeRO-3, every parameter partitioned)."""
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for s in tiny.sentences(16, seed=7, min_len=4):
            w = s.split()
            f.write(json.dumps({"text": " ".join(w[:-2]), "answer": " ".join(w[-2:])}) + "\n")
    ds = tiny.ds_config_file(tmp_path / "ds.json", 3)
    extra = ["--lmbda", "1"] if method == "gkd" else ["--num_rollouts", "4", "--ppo_epochs", "1",
                                                       "--target_column", "answer"]

    def argv(out, *more):
        return ["--method", method, "--teacher", str(assets / "teacher"), "--student.layers", "1", "--train_file",
                str(tmp_path / "prompts.jsonl"), "--output_dir", str(out), "--max_steps", "3",
                "--per_device_train_batch_size", "2", "--max_new_tokens", "5", "--learning_rate", "1e-3",
                "--lr_scheduler_type", "constant", "--logging_steps", "1", "--disable_tqdm", "true",
                "--deepspeed", ds, "--export", "false", *extra, *more]

    assert cli_main(argv(tmp_path / "plain")) == 0
    assert cli_main(argv(tmp_path / "ckpt", "--gradient_checkpointing", "true")) == 0
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "ckpt")
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)

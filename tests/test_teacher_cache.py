"""Offline top-k teacher cache: sparse loss, build (sharded, resumable), training from it with no teacher, refusals."""
import json
import os
import subprocess
import sys

import pytest
import torch

import tiny
from kd_engine.cli import main as cli_main
from kd_engine.losses.kd import kl_div_rows
from kd_engine.losses.sparse_kd import sparse_kd_loss, sparse_kl_rows, top_k_rows


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache_assets")
    tiny.make_llama(str(d / "teacher"), layers=3)
    tiny.make_llama(str(d / "student"), layers=1, seed=1)
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(24))
    return d


def test_sparse_kl_with_k_equal_vocab_is_the_full_kl_and_smaller_k_is_a_lower_bound():
    torch.manual_seed(0)
    s, t = torch.randn(6, 20), torch.randn(6, 20) * 2
    full = kl_div_rows(s, t, 2.0) / 4.0
    for k, check in ((20, "eq"), (5, "le"), (1, "le")):
        ids, logp, tail = top_k_rows(t, k, 2.0)
        got = sparse_kl_rows(s, ids, logp, tail, 2.0).mean()
        if check == "eq":
            assert got.item() == pytest.approx(full.item(), rel=1e-5)
        else:
            assert 0 <= got.item() <= full.item() + 1e-6
    # gradients flow to the student; masked rows and an empty mask
    s = s.requires_grad_(True)
    labels = torch.tensor([1, -100, 2, 3, -100, 4])
    ids, logp, tail = top_k_rows(t[labels != -100], 4, 1.0)
    terms = sparse_kd_loss(s, labels, ids, logp, tail, temperature=1.0, alpha=0.5)
    sum(terms.values()).backward()
    assert s.grad[1].abs().max().item() == 0.0 and s.grad[0].abs().max().item() > 0
    empty = sparse_kd_loss(s, torch.full((6,), -100), ids[:0], logp[:0], tail[:0], alpha=0.5)
    assert sum(empty.values()).item() == 0.0


def _build(assets, out, *extra):
    return cli_main_cache(["--teacher", str(assets / "teacher"), "--train_file", str(assets / "train.txt"),
                           "--output_dir", str(out), "--temperature", "2.0", "--max_length", "32", *extra])


def cli_main_cache(argv):
    from kd_engine.teacher_cache import main

    return main(argv)


def _train(assets, out, *extra):
    return ["--method", "kd", "--student", str(assets / "student"), "--train_file", str(assets / "train.txt"),
            "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "4", "--max_length", "32",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--disable_tqdm", "true", "--temperature", "2.0",
            *extra]


def _losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    return [(r["kd"], r["ce"]) for r in rows if r["split"] == "train"]


def test_cache_with_k_vocab_trains_like_online_kd_without_a_teacher(assets, tmp_path):
    from kd_engine.engine.trainer import Trainer
    from kd_engine.config import build_config

    assert _build(assets, tmp_path / "c", "--top_k", str(tiny.vocab_size()), "--chunk_size", "7", "--logp_dtype",
                  "fp32") == 0
    info = json.load(open(tmp_path / "c" / "complete.json"))
    assert info["examples"] == 24 and info["bytes_per_token"] == 8 * (tiny.vocab_size() + 1)
    cached = Trainer(build_config(_train(assets, tmp_path / "cached", "--teacher_cache", str(tmp_path / "c"))))
    cached.fit()
    assert cached.teacher_model is None  # trained with no teacher loaded
    Trainer(build_config(_train(assets, tmp_path / "online", "--teacher", str(assets / "teacher")))).fit()
    a, b = _losses(tmp_path / "cached"), _losses(tmp_path / "online")
    assert len(a) == 3
    for (ka, ca), (kb, cb) in zip(a, b):
        assert ka == pytest.approx(kb, rel=1e-4) and ca == pytest.approx(cb, rel=1e-4)


def test_lookup_by_content_finds_the_right_rows_in_any_order(assets, tmp_path):
    from kd_engine import teacher_cache_store as store
    from kd_engine.config import TrainConfig
    from kd_engine.data.supervised import build_supervised_data
    from kd_engine.losses.kd import shift_for_causal_lm
    from kd_engine.models.loading import load_tokenizer
    from transformers import AutoModelForCausalLM

    assert _build(assets, tmp_path / "c", "--top_k", "5", "--chunk_size", "5") == 0
    cache = store.TeacherCache(str(tmp_path / "c"))
    cfg = TrainConfig()
    cfg.train_file, cfg.max_length, cfg.teacher = str(assets / "train.txt"), 32, str(assets / "teacher")
    data = build_supervised_data(cfg, load_tokenizer(str(assets / "teacher")), "causal_lm")
    teacher = AutoModelForCausalLM.from_pretrained(str(assets / "teacher")).eval()
    order = [17, 3, 22, 0, 9]  # shuffled
    batch = data.collate_fn([data.train[i] for i in order])
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, lab = shift_for_causal_lm(logits, batch["labels"])
    ids, logp, tail, *_ = cache.lookup(store.batch_keys(batch, "causal_lm"), store.row_targets(lab))
    want_ids, want_logp, _ = top_k_rows(logits[lab != -100], 5, 2.0, tiny.vocab_size())
    assert torch.equal(ids, want_ids)
    assert torch.allclose(logp, want_logp, atol=2e-3)
    # a batch from another corpus is not silently served
    other = dict(batch, input_ids=batch["input_ids"].flip(1))
    with pytest.raises(Exception, match="no entry"):
        cache.lookup(store.batch_keys(other, "causal_lm"), store.row_targets(lab))


def test_interrupted_build_resumes_and_equals_a_straight_build(assets, tmp_path, monkeypatch):
    from kd_engine import teacher_cache_store as store
    from kd_engine.teachers import sparse_rows

    calls = {"n": 0}
    real = sparse_rows.teacher_rows

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(sparse_rows, "teacher_rows", counting)
    assert _build(assets, tmp_path / "straight", "--top_k", "4", "--chunk_size", "6", "--batch_size", "3") == 0
    straight_calls, calls["n"] = calls["n"], 0
    real_save = store.save

    def crash_on_third_part(obj, path):
        if os.path.basename(path).startswith("part-0000000012"):
            raise KeyboardInterrupt  # killed while building the third part
        real_save(obj, path)

    monkeypatch.setattr(store, "save", crash_on_third_part)
    with pytest.raises(KeyboardInterrupt):
        _build(assets, tmp_path / "resumed", "--top_k", "4", "--chunk_size", "6", "--batch_size", "3")
    names = sorted(os.listdir(tmp_path / "resumed"))
    assert "complete.json" not in names and sum(n.startswith("part-") for n in names) == 2
    from kd_engine.errors import KDError
    with pytest.raises(KDError, match="unfinished"):
        store.TeacherCache(str(tmp_path / "resumed"))
    monkeypatch.setattr(store, "save", real_save)
    calls["n"] = 0
    assert _build(assets, tmp_path / "resumed", "--top_k", "4", "--chunk_size", "6", "--batch_size", "3") == 0
    assert 0 < calls["n"] < straight_calls  # the two finished parts were not recomputed
    a = torch.load(tmp_path / "straight" / "shard-00000.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "shard-00000.pt", weights_only=True)
    assert a["keys"] == b["keys"] and all(torch.equal(a[k], b[k]) for k in ("ids", "logp", "log_tail", "offsets",
                                                                            "tail_ids", "tail_logp"))
    assert not any(n.startswith("part-") for n in os.listdir(tmp_path / "resumed"))


def test_bad_input_exit_2_and_nothing_written(assets, tmp_path, capsys):
    v = tiny.vocab_size()
    for k in ("0", str(v + 1)):
        assert _build(assets, tmp_path / f"c{k}", "--top_k", k) == 2
        assert "top_k" in capsys.readouterr().err and not (tmp_path / f"c{k}").exists()
    assert _build(assets, tmp_path / "c", "--top_k", "4") == 0
    # not a cache
    (tmp_path / "notcache").mkdir()
    assert cli_main(_train(assets, tmp_path / "o1", "--teacher_cache", str(tmp_path / "notcache"))) == 2
    assert "not a teacher cache" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    # mismatched manifest: another max length, another temperature, another corpus
    assert cli_main(_train(assets, tmp_path / "o2", "--teacher_cache", str(tmp_path / "c"), "--max_length",
                           "16")) == 2
    assert "max_length" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    assert cli_main(_train(assets, tmp_path / "o3", "--teacher_cache", str(tmp_path / "c"), "--temperature",
                           "1.0")) == 2
    assert "temperature" in capsys.readouterr().err and not (tmp_path / "o3").exists()
    other = tmp_path / "other.txt"
    tiny.write_lines(str(other), tiny.sentences(24, seed=9))
    argv = _train(assets, tmp_path / "o4", "--teacher_cache", str(tmp_path / "c"))
    argv[argv.index("--train_file") + 1] = str(other)
    assert cli_main(argv) == 2
    assert "corpus_sha256" in capsys.readouterr().err and not (tmp_path / "o4").exists()
    # a build into the cache folder with other settings is refused, the cache kept
    assert _build(assets, tmp_path / "c", "--top_k", "8") == 2
    assert "top_k" in capsys.readouterr().err and (tmp_path / "c" / "complete.json").exists()


@pytest.mark.slow
@pytest.mark.multirank
def test_two_rank_build_and_shuffled_two_rank_training_read_the_right_rows(assets, tmp_path):
    """Built on 2 ranks (one shard each), trained on 2 ranks with shuffling (ZeRO-0 and ZeRO-3): every lookup checks
    the cached target tokens against the batch (a wrong row raises), and the losses equal the online 2-rank run's."""
    from kd_engine.dist import free_port

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = tiny.cpu_env({"KD_ENGINE_CACHE": str(tmp_path / "kc")})

    def launch(module_or_script, argv):
        cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        cmd += (["-m", module_or_script] if module_or_script.startswith("kd_engine") else [module_or_script])
        r = subprocess.run(cmd + argv, env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]

    launch("kd_engine.teacher_cache", ["--teacher", str(assets / "teacher"), "--train_file",
                                       str(assets / "train.txt"), "--output_dir", str(tmp_path / "c"), "--top_k",
                                       str(tiny.vocab_size()), "--temperature", "2.0", "--max_length", "32",
                                       "--chunk_size", "8", "--logp_dtype", "fp32"])
    assert sorted(n for n in os.listdir(tmp_path / "c") if n.startswith("shard")) == ["shard-00000.pt",
                                                                                     "shard-00001.pt"]
    train = os.path.abspath("launch/train.py")
    launch(train, _train(assets, tmp_path / "cached", "--teacher_cache", str(tmp_path / "c"),
                         "--per_device_train_batch_size", "2"))
    launch(train, _train(assets, tmp_path / "online", "--teacher", str(assets / "teacher"),
                         "--per_device_train_batch_size", "2"))
    # ZeRO-3 with every parameter partitioned: the fused cached loss runs inside the student's output layer, where
    # DeepSpeed's hooks gather the lm_head weight
    tiny.ds_config_file(tmp_path / "z3.json")
    launch(train, _train(assets, tmp_path / "cached_z3", "--teacher_cache", str(tmp_path / "c"),
                         "--per_device_train_batch_size", "2", "--deepspeed", str(tmp_path / "z3.json")))
    a, b, c = _losses(tmp_path / "cached"), _losses(tmp_path / "online"), _losses(tmp_path / "cached_z3")
    assert len(a) == len(c) == 3
    for (ka, ca), (kb, cb), (kc, cc) in zip(a, b, c):
        assert ka == pytest.approx(kb, rel=1e-4) and ca == pytest.approx(cb, rel=1e-4)
        assert kc == pytest.approx(kb, rel=1e-4) and cc == pytest.approx(cb, rel=1e-4)


def test_sampled_tail_is_an_unbiased_estimate_of_the_full_kl_and_its_gradient():
    """methods: the top-k + sampled-tail loss averages (over the draws) to the full forward KL and its gradient,
    where the top-k + tail-mass bucket loss stays a biased lower bound; with k = vocab both are the full KL."""
    from kd_engine.losses.sparse_kd import sample_tail, teacher_rows

    torch.manual_seed(0)
    s, t = torch.randn(4, 40, dtype=torch.float64).float(), torch.randn(4, 40) * 2
    s.requires_grad_(True)
    full = kl_div_rows(s, t, 1.0)
    (g_full,) = torch.autograd.grad(full, s)
    ids, logp, tail, log_p = teacher_rows(t, 5)
    g = torch.Generator().manual_seed(0)
    draws, grads = [], []
    for _ in range(3000):
        t_ids, t_logp = sample_tail(log_p, ids, 4, g)
        assert not (t_ids.unsqueeze(-1) == ids.unsqueeze(1)).any()  # drawn outside the top k only
        assert torch.equal(t_logp, log_p.gather(1, t_ids))
        est = sparse_kl_rows(s, ids, logp, tail, 1.0, None, t_ids, t_logp).mean()
        draws.append(est.detach())
        grads.append(torch.autograd.grad(est, s)[0])
    draws, grads = torch.stack(draws), torch.stack(grads)
    se = draws.std() / len(draws) ** 0.5
    assert abs(draws.mean() - full.detach()) < 4 * se
    g_se = grads.std(0) / len(grads) ** 0.5
    assert ((grads.mean(0) - g_full).abs() <= 4 * g_se + 1e-6).float().mean() > 0.97
    bucket = sparse_kl_rows(s, ids, logp, tail, 1.0).mean()
    assert full.item() - bucket.item() > 20 * se  # the bucket form misses the tail's shape
    # k = vocab: the tail is empty, the samples weigh 0, the loss is the full KL
    ids, logp, tail, log_p = teacher_rows(t, 40)
    t_ids, t_logp = sample_tail(log_p, ids, 4, g)
    assert sparse_kl_rows(s, ids, logp, tail, 1.0, None, t_ids, t_logp).mean().item() == pytest.approx(
        full.item(), rel=1e-5)


def test_tail_samples_are_fixed_per_example_whatever_the_chunking(assets, tmp_path):
    from kd_engine import teacher_cache_store as store

    assert _build(assets, tmp_path / "a", "--top_k", "4", "--tail_samples", "6", "--chunk_size", "5",
                  "--batch_size", "2") == 0
    assert _build(assets, tmp_path / "b", "--top_k", "4", "--tail_samples", "6", "--chunk_size", "24",
                  "--batch_size", "7") == 0
    assert _build(assets, tmp_path / "s1", "--top_k", "4", "--tail_samples", "6", "--seed", "1") == 0
    info = json.load(open(tmp_path / "a" / "complete.json"))
    assert info["tail_samples"] == 6 and info["bytes_per_token"] == 6 * (4 + 1 + 6)
    caches = [store.TeacherCache(str(tmp_path / n)) for n in ("a", "b", "s1")]
    shards = [torch.load(tmp_path / n / "shard-00000.pt", weights_only=True) for n in ("a", "b", "s1")]
    assert shards[0]["tail_ids"].shape == (int(shards[0]["offsets"][-1]), 6)
    for key, (_, lo, hi) in caches[0].index.items():
        _, lo_b, hi_b = caches[1].index[key]
        assert torch.equal(shards[0]["tail_ids"][lo:hi], shards[1]["tail_ids"][lo_b:hi_b])
        assert torch.equal(shards[0]["tail_logp"][lo:hi], shards[1]["tail_logp"][lo_b:hi_b])
        assert not (shards[0]["tail_ids"][lo:hi].unsqueeze(-1) == shards[0]["ids"][lo:hi].unsqueeze(1)).any()
    assert not torch.equal(shards[0]["tail_ids"], shards[2]["tail_ids"])  # another --seed, other draws
    from kd_engine.config import build_config
    from kd_engine.engine.trainer import Trainer

    # training from it (fused in the student's output layer by default, and naive on full logits): the lookup hands
    # the samples to the loss, both give the same losses
    Trainer(build_config(_train(assets, tmp_path / "run", "--teacher_cache", str(tmp_path / "a")))).fit()
    Trainer(build_config(_train(assets, tmp_path / "naive", "--teacher_cache", str(tmp_path / "a"),
                                "--kd_loss_impl", "naive"))).fit()
    fused, naive = _losses(tmp_path / "run"), _losses(tmp_path / "naive")
    assert len(fused) == 3 and all(torch.isfinite(torch.tensor(fused)).flatten())
    for (ka, ca), (kb, cb) in zip(fused, naive):
        assert ka == pytest.approx(kb, rel=1e-4) and ca == pytest.approx(cb, rel=1e-4)
    assert _build(assets, tmp_path / "neg", "--top_k", "4", "--tail_samples", "-1") == 2
    assert not (tmp_path / "neg").exists()

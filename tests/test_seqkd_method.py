"""SeqKD: the teacher-response cache (sharding, key refusal, resume) and the seqkd plugin end to end."""
import json
import os
import threading

import pytest
import torch

import tiny
from kd_engine.config import build_config
from kd_engine.errors import ConfigError, KDError
from kd_engine.teachers import seqkd_cache


def _fake_generate(calls, fail_after=None):
    """A deterministic 'teacher': the response is the prompt reversed plus its length."""
    def gen(prompts):
        if fail_after is not None and len(calls) >= fail_after:
            raise RuntimeError("killed")
        calls.append(len(prompts))
        return [list(reversed(p)) + [len(p)] for p in prompts]
    return gen


PROMPTS = [[i, i + 1, i % 3] * (1 + i % 4) for i in range(23)]
KEY = {"teacher": "t", "decoding": {"do_sample": False}}


def test_cache_resumes_an_interrupted_build_and_refuses_another_key(tmp_path):
    want = [list(reversed(p)) + [len(p)] for p in PROMPTS]
    calls = []
    with pytest.raises(RuntimeError):  # dies in the 3rd chunk: chunks 1-2 (2 batches each) are on disk
        seqkd_cache.teacher_responses(_fake_generate(calls, fail_after=5), PROMPTS, KEY, str(tmp_path / "c"),
                                      batch_size=3, chunk_size=5)
    assert len(calls) == 5 and len(list((tmp_path / "c").glob("chunk_*.pt"))) == 2
    calls2 = []
    got, info = seqkd_cache.teacher_responses(_fake_generate(calls2), PROMPTS, KEY, str(tmp_path / "c"),
                                              batch_size=3, chunk_size=5)
    assert got == want and info == {"hit": False, "resumed_chunks": 2, "generated_chunks": 3}
    assert len(calls2) == 5  # chunks 3-5 of 5,5,5,5,3 only: 2 + 2 + 1 batches
    assert not list((tmp_path / "c").glob("chunk_*.pt")) and (tmp_path / "c" / "responses.pt").exists()
    calls3 = []
    got, info = seqkd_cache.teacher_responses(_fake_generate(calls3), PROMPTS, KEY, str(tmp_path / "c"))
    assert got == want and info["hit"] and calls3 == []
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "c").iterdir())
    other = {"teacher": "t", "decoding": {"do_sample": True}}
    with pytest.raises(KDError, match="decoding"):
        seqkd_cache.teacher_responses(_fake_generate([]), PROMPTS, other, str(tmp_path / "c"))
    with pytest.raises(KDError, match="prompts|n_prompts|responses"):  # same key, other prompts: another file
        seqkd_cache.teacher_responses(_fake_generate([]), PROMPTS[:-1], {**KEY, "n_prompts": 22},
                                      str(tmp_path / "c"))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "c").iterdir()) == before


def test_cache_sharded_over_two_ranks_runs_equal_batch_counts(tmp_path):
    """Two ranks (threads with an all-gather): same responses as one rank, and every rank calls the teacher the
    same number of times even when its share is smaller (ZeRO-3 forwards are collectives)."""
    barrier = threading.Barrier(2)
    slots = [None, None]

    def gather(obj, rank):
        slots[rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    calls = {0: [], 1: []}
    results = {}

    def run(rank):
        results[rank] = seqkd_cache.teacher_responses(
            _fake_generate(calls[rank]), PROMPTS, KEY, str(tmp_path / "c") if rank == 0 else None, batch_size=2,
            chunk_size=7, rank=rank, world_size=2, gather=lambda o: gather(o, rank))[0]

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    want = [list(reversed(p)) + [len(p)] for p in PROMPTS]
    assert results[0] == results[1] == want
    # chunks of 7,7,7,2 -> shares 4|3 -> 2 batches on each rank, then 1|1 -> 1
    assert calls[0] == [2, 2] * 3 + [1] and calls[1] == [2, 1] * 3 + [1]
    assert (tmp_path / "c" / "responses.pt").exists()


@pytest.fixture(scope="module", autouse=True)
def _single_process_env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from test_gkd_method import write_pairs

    d = tmp_path_factory.mktemp("seqkd_assets")
    tiny.make_llama(str(d / "teacher"), layers=2)
    write_pairs(d / "pairs.jsonl", 12, seed=5)
    return d


def _run(argv):
    from kd_engine.engine.trainer import Trainer

    tr = Trainer(build_config(argv))
    tr.fit()
    return tr


def _argv(teacher, assets, out, *extra):
    return ["--method", "seqkd", "--teacher", str(teacher), "--student.layers", "1", "--train_file",
            str(assets / "pairs.jsonl"), "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--max_new_tokens", "6", "--logging_steps", "1",
            "--disable_tqdm", "true", "--seqkd_batch_size", "5", *extra]


def _greedy(model, tok, prompts, max_new):
    from kd_engine.data.prompt_response import PromptResponseCollator, unpad
    from kd_engine.models.sampling import mixed_sample

    enc = model.config.is_encoder_decoder
    b = PromptResponseCollator(tok.pad_token_id, not enc)([{"prompt_ids": p} for p in prompts])
    r = mixed_sample(model, None, b["prompt_ids"], b["prompt_mask"], max_new_tokens=max_new,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, alpha=0.0, do_sample=False,
                     vocab_size=len(tok))
    return unpad(r.response_ids, r.response_mask)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_seqkd_trains_on_the_teachers_greedy_responses_and_reuses_them(assets, tmp_path, arch):
    from transformers import AutoTokenizer

    if arch == "t5":
        from test_minillm_method import _t5_teacher
        from transformers import T5ForConditionalGeneration

        teacher = _t5_teacher(tmp_path)
        model = T5ForConditionalGeneration.from_pretrained(str(teacher))
    else:
        from transformers import LlamaForCausalLM

        teacher = assets / "teacher"
        model = LlamaForCausalLM.from_pretrained(str(teacher))
    cache = tmp_path / "cache"
    tr = _run(_argv(teacher, assets, tmp_path / "a", "--seqkd_cache", str(cache), "--eval_file",
                    str(assets / "pairs.jsonl"), "--target_column", "answer", "--max_eval_samples", "4"))
    rows = tr.data.train
    tok = AutoTokenizer.from_pretrained(str(teacher))
    want = _greedy(model.eval(), tok, [r["prompt_ids"] for r in rows], 6)
    assert [r["response_ids"] for r in rows] == want
    assert tr.method.seqkd_info["generated_chunks"] == 1 and not tr.method.seqkd_info["hit"]
    log = [json.loads(x) for x in open(tmp_path / "a" / "train_log.jsonl")]
    assert all(torch.isfinite(torch.tensor(r["ce"])) for r in log if r["split"] == "train")
    assert "teacher_lm_loss" in [r for r in log if r["split"] == "eval"][-1]
    key = json.load(open(cache / "key.json"))
    assert key["decoding"] == {"do_sample": False, "max_new_tokens": 6, "max_prompt_length": 256}
    # another student (2 layers) reuses the responses: no generation at all
    tr2 = _run(_argv(teacher, assets, tmp_path / "b", "--seqkd_cache", str(cache), "--student.layers", "2"))
    assert tr2.method.seqkd_info["hit"] and [r["response_ids"] for r in tr2.data.train] == want
    # sampled decoding is another key: refused at config time for this folder, nothing written
    with pytest.raises(ConfigError, match="do_sample"):
        build_config(_argv(teacher, assets, tmp_path / "c", "--seqkd_cache", str(cache), "--seqkd_do_sample",
                           "true"))
    assert not (tmp_path / "c").exists()


def test_seqkd_sampled_default_cache_folders_differ_per_key(assets, tmp_path):
    root = os.environ["KD_ENGINE_CACHE"]
    a = _run(_argv(assets / "teacher", assets, tmp_path / "a", "--seqkd_do_sample", "true", "--max_steps", "1"))
    b = _run(_argv(assets / "teacher", assets, tmp_path / "b", "--seqkd_do_sample", "true", "--max_steps", "1",
                   "--seqkd_temperature", "0.5"))
    ia, ib = a.method.seqkd_info, b.method.seqkd_info
    assert ia["cache"] != ib["cache"] and ia["cache"].startswith(root) and not ib["hit"]
    assert json.load(open(os.path.join(ib["cache"], "key.json")))["decoding"]["temperature"] == 0.5
    c = _run(_argv(assets / "teacher", assets, tmp_path / "c", "--seqkd_do_sample", "true", "--max_steps", "1"))
    assert c.method.seqkd_info["hit"] and [r["response_ids"] for r in c.data.train] == \
        [r["response_ids"] for r in a.data.train]


def test_seqkd_refuses_a_cache_after_the_teacher_changed(assets, tmp_path):
    """Same teacher path, retrained weights: the cached responses are not the new teacher's -> refused, kept."""
    teacher = tmp_path / "teacher"
    tiny.make_llama(str(teacher), layers=2, seed=0)
    cache = tmp_path / "cache"
    _run(_argv(teacher, assets, tmp_path / "a", "--seqkd_cache", str(cache), "--max_steps", "1"))
    tiny.make_llama(str(teacher), layers=2, seed=1)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir())
    with pytest.raises(KDError, match="weights"):
        _run(_argv(teacher, assets, tmp_path / "b", "--seqkd_cache", str(cache), "--max_steps", "1"))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir()) == before


@pytest.mark.slow
def test_seqkd_killed_mid_generation_resumes_from_its_finished_chunks(assets, tmp_path):
    """A real SIGKILL of the training process while the teacher generates: the finished chunks stay, nothing looks
    complete, and the rerun generates only the missing chunks; its responses equal an uninterrupted build's."""
    import signal
    import subprocess
    import sys
    import time

    from test_gkd_method import write_pairs

    write_pairs(tmp_path / "many.jsonl", 240, seed=7)
    env = tiny.cpu_env({"KD_ENGINE_CACHE": str(tmp_path / "kc")})

    def cmd(out, cache):
        argv = _argv(assets / "teacher", assets, out, "--seqkd_cache", str(cache), "--seqkd_chunk_size", "2",
                     "--seqkd_batch_size", "2", "--max_new_tokens", "12", "--max_steps", "1")
        argv[argv.index("--train_file") + 1] = str(tmp_path / "many.jsonl")
        return [sys.executable, os.path.abspath("launch/train.py"), *argv]

    killed = tmp_path / "killed_cache"
    p = subprocess.Popen(cmd(tmp_path / "a", killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and len(list(killed.glob("chunk_*.pt"))) < 3:
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = len(list(killed.glob("chunk_*.pt")))
    assert done >= 3 and not (killed / "responses.pt").exists(), "the build finished before the kill"
    r = subprocess.run(cmd(tmp_path / "b", killed), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [ln for ln in r.stderr.splitlines() if "resuming" in ln]
    assert resumed and f"{done} of 120 chunks" in resumed[0], resumed
    assert "(%d chunks generated)" % (120 - done) in r.stderr
    straight = tmp_path / "straight_cache"
    r = subprocess.run(cmd(tmp_path / "c", straight), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(d / "responses.pt", weights_only=True) for d in (killed, straight))
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["lengths"], b["lengths"])
    assert not list(killed.glob("chunk_*.pt"))

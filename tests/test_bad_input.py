"""README "Bad input": every case gives exit 2, exactly one `error:` line, and leaves the output folder
byte-identical (a previous run in it survives a rejected --overwrite_output_dir; a new folder is not created)."""
import hashlib
import json
import os

import pytest

import tiny
from kd_engine.cli import main as cli_main


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    tiny.make_llama(str(d / "teacher"), layers=2)
    tiny.make_llama(str(d / "other_vocab"), layers=2, tokenizer_kind="bert")
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(24))
    (d / "empty.txt").write_text("")
    (d / "bad_utf8.txt").write_bytes(b"fine line\n\xff\xfe broken\n")
    (d / "not_json.json").write_text("{ not json")
    (d / "inconsistent.json").write_text(json.dumps({"train_batch_size": 7, "train_micro_batch_size_per_gpu": 4,
                                                     "gradient_accumulation_steps": 1}))
    (d / "fp16.json").write_text(json.dumps({"fp16": {"enabled": True}}))
    (d / "micro3.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))  # the command line says 4
    (d / "garbage.yaml").write_bytes(bytes(range(128, 256)) * 4)
    (d / "stage7.json").write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    (d / "typo_key.json").write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    (d / "typo_zero_key.json").write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comn": True}}))
    import shutil

    import torch

    shutil.copytree(d / "teacher", d / "truncated")
    w = d / "truncated" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    shutil.copytree(d / "teacher", d / "pickled")
    os.remove(d / "pickled" / "model.safetensors")

    class Payload:  # a pickle that would run code: torch's weights_only loader refuses it
        def __reduce__(self):
            return (os.getpid, ())

    torch.save({"w": Payload()}, d / "pickled" / "pytorch_model.bin")
    shutil.copytree(d / "teacher", d / "no_tokenizer")
    for f in os.listdir(d / "no_tokenizer"):
        if "token" in f:
            os.remove(d / "no_tokenizer" / f)
    _file_layer_assets(d)
    prev = d / "previous_run"
    assert cli_main(_args(d, prev, "--max_steps", "1", "--export", "false")) == 0
    (prev / "notes.txt").write_text("user's own file")
    return d


def _file_layer_assets(d):
    """Damaged files of every kind kd_engine reads (tests/test_hostile_inputs.py, FILE_LAYER_CASES)."""
    import shutil

    from kd_engine.teacher_cache import main as build_cache

    shutil.copytree(d / "teacher", d / "bad_tok")
    (d / "bad_tok" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    (d / "list.json").write_text("[1, 2]")
    (d / "ds_garbage.json").write_bytes(bytes(range(128, 256)))
    (d / "ds_list.json").write_text("[]")
    (d / "broken.jsonl").write_text('{"text": "a b c"}\n{"text": \n')
    (d / "bad.csv").write_bytes(b"text\nfine\n\xe9t\xe9\n")
    (d / "pairs.jsonl").write_text("".join(json.dumps({"text": f"q {i} cats", "target": f"a {i}"}) + "\n"
                                           for i in range(8)))
    for name, data in (("seqkd_bad", b"\xff\xfe"), ("seqkd_list", b"[]")):
        (d / name).mkdir()
        (d / name / "key.json").write_bytes(data)
    (d / "cache_bad_manifest").mkdir()
    (d / "cache_bad_manifest" / "manifest.json").write_text('{ "format": 1,')
    (d / "cache_no_keys").mkdir()
    (d / "cache_no_keys" / "manifest.json").write_text(json.dumps({"format": 1, "top_k": 4, "temperature": 2.0}))
    assert build_cache(["--teacher", str(d / "teacher"), "--train_file", str(d / "train.txt"), "--output_dir",
                        str(d / "tc"), "--top_k", "4", "--max_length", "32"]) == 0
    shutil.copytree(d / "tc", d / "tc_trunc")
    shard = d / "tc_trunc" / "shard-00000.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    shutil.copytree(d / "tc", d / "tc_list")
    (d / "tc_list" / "complete.json").write_text("[]")


def _args(d, out, *extra):
    return ["--method", "kd", "--teacher", str(d / "teacher"), "--student.layers", "1", "--train_file",
            str(d / "train.txt"), "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--disable_tqdm", "true", *extra]


# (name, extra arguments, words the error line must contain); README "Bad input" lists the same cases
CASES = [
    ("unknown method", ["--method", "kdd"], "did you mean 'kd'"),
    ("misspelled key", ["--learning_rat", "1e-4"], "did you mean 'learning_rate'"),
    ("missing model path", ["--teacher", "./no/such/model"], "model path not found"),
    ("missing data file", ["--train_file", "no_such.txt"], "does not exist"),
    ("empty data file", ["--train_file", "{d}/empty.txt"], "empty"),
    ("non-UTF-8 data", ["--train_file", "{d}/bad_utf8.txt"], "line 2"),
    ("DeepSpeed JSON not JSON", ["--deepspeed", "{d}/not_json.json"], "not valid JSON"),
    ("inconsistent batch sizes", ["--deepspeed", "{d}/inconsistent.json"], "inconsistent batch sizes"),
    ("fp16 on CPU", ["--deepspeed", "{d}/fp16.json"], "fp16"),
    ("batch sizes set differently", ["--deepspeed", "{d}/micro3.json"], "batch sizes disagree"),
    ("eval_file with eval_split", ["--eval_file", "{d}/train.txt", "--eval_split", "0.2"], "exclude each other"),
    ("tokenizer mismatch", ["--student", "{d}/other_vocab"], "tokenizers differ"),
    ("absurd learning rate", ["--learning_rate", "1e6"], "learning_rate must be in"),
    ("negative max_steps", ["--max_steps", "-5"], "max_steps must be"),
    ("temperature out of range", ["--temperature", "0"], "temperature must be in"),
    ("non-finite value", ["--learning_rate", "nan"], "finite"),
    ("max_nonfinite_steps 0", ["--max_nonfinite_steps", "0"], "max_nonfinite_steps must be >= 1"),
    ("forgotten teacher", ["--teacher", ""], "needs a teacher: pass --teacher"),
    ("binary garbage YAML", ["--config", "{d}/garbage.yaml"], "is not UTF-8 text"),
    ("folder as YAML", ["--config", "{d}"], "is a folder, not a file"),
    ("DeepSpeed value it rejects", ["--deepspeed", "{d}/stage7.json"], "zero_optimization.stage: Input should be"),
    ("DeepSpeed key typo", ["--deepspeed", "{d}/typo_key.json"], "did you mean 'zero_optimization'"),
    ("DeepSpeed zero key typo", ["--deepspeed", "{d}/typo_zero_key.json"], "did you mean 'overlap_comm'"),
    ("empty output_dir", ["--output_dir", ""], "output_dir must not be empty"),
    ("truncated safetensors", ["--teacher", "{d}/truncated"], "model.safetensors is damaged or incomplete"),
    ("pickle-only weights", ["--teacher", "{d}/pickled"], "pytorch_model.bin is a pickle"),
    ("folder without tokenizer", ["--teacher", "{d}/no_tokenizer"], "holds no usable tokenizer"),
    ("file as model folder", ["--teacher", "{d}/teacher/config.json"], "is a file; give the folder"),
]


def _snapshot(folder):
    if not os.path.exists(folder):
        return None
    out = {}
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, folder)
            out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) else "dir"
    return out


def _one_error(capsys, argv):
    rc = cli_main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    return rc, lines


@pytest.mark.parametrize("name,extra,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_writes_nothing(assets, tmp_path, capsys, name, extra, needle):
    extra = [e.replace("{d}", str(assets)) for e in extra]
    prev = assets / "previous_run"
    before = _snapshot(prev)
    # into the folder of a finished run, asking to replace it: the old run must survive the rejection
    rc, lines = _one_error(capsys, _args(assets, prev, "--overwrite_output_dir", *extra))
    assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
    assert _snapshot(prev) == before
    # into a new folder: it is not created
    fresh = tmp_path / "new_run"
    rc, lines = _one_error(capsys, _args(assets, fresh, *extra))
    assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not fresh.exists()


def test_output_folder_holding_another_run(assets, capsys):
    prev = assets / "previous_run"
    before = _snapshot(prev)
    rc, lines = _one_error(capsys, _args(assets, prev))
    assert rc == 2 and len(lines) == 1 and "already holds another kd_engine run" in lines[0]
    assert _snapshot(prev) == before


def test_overwrite_output_dir_replaces_only_what_kd_engine_wrote(assets, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(assets / "previous_run", out)
    (out / ".hidden_notes").write_text("keep me")
    (out / "checkpoints" / ".tmp-step-00000009").mkdir()  # a crashed write of the old run
    old_marker = (out / "kd_run.json").read_text()
    assert cli_main(_args(assets, out, "--overwrite_output_dir", "--max_steps", "2", "--export", "false")) == 0
    assert (out / "notes.txt").read_text() == "user's own file" and (out / ".hidden_notes").read_text() == "keep me"
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002"]  # the old run's step-1 checkpoint is gone
    assert (out / "kd_run.json").read_text() != old_marker
    assert "done: 2 steps; checkpoints in" in capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["final", "checkpoints", "train_log.jsonl"])
def test_symlinks_out_of_the_run_folder_are_never_written_through_or_deleted(assets, tmp_path, capsys, name):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(assets / "previous_run", out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("do not touch")
    target = elsewhere if name != "train_log.jsonl" else elsewhere / "precious.txt"
    link = out / name
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    elif link.exists():
        link.unlink()
    link.symlink_to(target)
    before, outside = _snapshot(out), _snapshot(elsewhere)
    for extra in (["--overwrite_output_dir"], ["--resume"], ["--resume", "auto"]):
        rc, lines = _one_error(capsys, _args(assets, out, *extra))
        assert rc == 2 and len(lines) == 1 and "is a symbolic link to" in lines[0], (extra, lines)
    assert _snapshot(out) == before and _snapshot(elsewhere) == outside

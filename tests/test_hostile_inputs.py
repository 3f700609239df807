"""Hostile and careless input, one table: every case exits 2 with exactly one `error:` line and no traceback, and
leaves the output folder (a finished run asked to be replaced, or a new folder) and every input file byte-identical.
The cases of tests/test_bad_input.py plus option values, chat, packing, attention and checkpointing misuse."""
import pytest

import tiny
from test_bad_input import CASES as FILE_CASES
from test_bad_input import _args, _snapshot, assets  # noqa: F401  (the module's fixture, shared)
from kd_engine.cli import main as cli_main


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


OPTION_CASES = [
    ("max_length 0", ["--max_length", "0"], "max_length must be >= 1"),
    ("batch 0", ["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1"),
    ("eval batch 0", ["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size must be >= 1"),
    ("accumulation 0", ["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be >= 1"),
    ("save_total_limit 0", ["--save_total_limit", "0"], "save_total_limit must be >= 1"),
    ("logging_steps 0", ["--logging_steps", "0"], "logging_steps must be >= 1"),
    ("negative warmup", ["--warmup_steps", "-1"], "warmup_steps must be >= 0"),
    ("negative save_steps", ["--save_steps", "-3"], "save_steps must be >= 0"),
    ("negative eval_steps", ["--eval_steps", "-3"], "eval_steps must be >= 0"),
    ("max_train_samples 0", ["--max_train_samples", "0"], "max_train_samples must be >= 1"),
    ("eval_split 1.5", ["--eval_split", "1.5"], "eval_split must be in [0, 1)"),
    ("weight decay 2", ["--weight_decay", "2"], "weight_decay must be in [0, 1]"),
    ("beta1 1", ["--adam_beta1", "1"], "adam_beta1 must be in [0, 1)"),
    ("epsilon 0", ["--adam_epsilon", "0"], "adam_epsilon must be in (0, 1]"),
    ("negative clipping", ["--max_grad_norm", "-1"], "max_grad_norm must be >= 0"),
    ("negative seed", ["--seed", "-1"], "seed must be in [0, 2**32)"),
    ("dist_timeout 0", ["--dist_timeout", "0"], "dist_timeout must be > 0"),
    ("resume maybe", ["--resume", "maybe"], "resume must be one of"),
    ("resume with overwrite", ["--resume", "--overwrite_output_dir"], "exclude each other"),
    ("report_to wandb", ["--report_to", "wandb"], "report_to must be one of"),
    ("scheduler typo", ["--lr_scheduler_type", "cosin"], "lr_scheduler_type must be one of"),
    ("teacher dtype fp8", ["--teacher_dtype", "fp8"], "teacher_dtype must be one of"),
    ("student init typo", ["--student.init", "copy"], "student.init must be one of"),
    ("uncatchable stop signal", ["--stop_signals", "KILL"], "not a signal that can be caught"),
    ("text for an int", ["--max_steps", "ten"], "expects int"),
    ("fraction for an int", ["--max_length", "12.5"], "expects int"),
    ("infinite float", ["--learning_rate", "inf"], "finite"),
    ("bool typo", ["--group_by_length", "ture"], "expects bool"),
    ("alpha 2", ["--alpha", "2"], "alpha must be in [0, 1]"),
    ("divergence typo", ["--divergence", "kl"], "divergence"),
    ("kd_loss_impl typo", ["--kd_loss_impl", "fast"], "kd_loss_impl must be"),
    ("option without value", ["--max_steps"], "needs a value"),
    ("stray argument", ["--max_steps", "2", "oops"], "unexpected argument 'oops'"),
    ("attention unknown", ["--attn_implementation", "fast"], "attn_implementation must be one of"),
    ("packing for minilmv2", ["--method", "minilmv2", "--packing", "true"], "needs one example per row"),
    ("packing for gkd", ["--method", "gkd", "--packing", "true", "--target_column", "x"], "needs one example per row"),
    ("chat for mate_kd", ["--method", "mate_kd", "--messages_column", "messages"], "does not read chat data"),
    ("chat with a target column", ["--messages_column", "messages", "--target_column", "y"],
     "excludes --target_column"),
    ("chat template missing", ["--messages_column", "text"], "has none"),
    ("uld_weight negative", ["--method", "xtoken_kd", "--uld_weight", "-1"], "uld_weight must be in [0, 100]"),
    ("uld alignment typo", ["--method", "uld", "--alignment", "diagonal"], "alignment must be position or span"),
    ("cross-tokenizer pairs", ["--method", "xtoken_kd", "--text_pair_column", "x"], "plain text"),
    ("cross-tokenizer no aligned span", ["--method", "uld", "--max_length", "1"], "share a span"),
]
_CACHED = ["--student", "{d}/teacher", "--max_length", "32"]
_SEQKD = ["--method", "seqkd", "--train_file", "{d}/pairs.jsonl", "--max_new_tokens", "4"]
# every kind of file goes through kd_engine/input_files.py (tests/test_input_files.py checks the source)
FILE_LAYER_CASES = [
    ("garbage tokenizer.json", ["--teacher", "{d}/bad_tok"], "holds no usable tokenizer (tokenizer.json"),
    ("garbage --tokenizer", ["--tokenizer", "{d}/bad_tok"], "holds no usable tokenizer (tokenizer.json"),
    ("JSON config holding a list", ["--config", "{d}/list.json"], "list.json must hold a mapping"),
    ("DeepSpeed JSON not UTF-8", ["--deepspeed", "{d}/ds_garbage.json"], "ds_garbage.json is not UTF-8 text"),
    ("DeepSpeed JSON holding a list", ["--deepspeed", "{d}/ds_list.json"], "ds_list.json must hold a mapping"),
    ("JSONL with a broken record", ["--train_file", "{d}/broken.jsonl"], "broken.jsonl': line 2"),
    ("CSV not UTF-8", ["--train_file", "{d}/bad.csv"], "bad.csv' is not UTF-8: line 3"),
    ("teacher cache manifest not JSON", ["--teacher_cache", "{d}/cache_bad_manifest"], "is not valid JSON"),
    ("teacher cache manifest lacking keys", ["--teacher_cache", "{d}/cache_no_keys"], "lacks teacher, tokenizer"),
    ("teacher cache shard truncated", ["--teacher_cache", "{d}/tc_trunc", *_CACHED],
     "shard-00000.pt is truncated or not a torch file"),
    ("teacher cache marker a list", ["--teacher_cache", "{d}/tc_list", *_CACHED],
     "complete.json must hold a JSON mapping"),
    ("seqkd cache key not UTF-8", [*_SEQKD, "--seqkd_cache", "{d}/seqkd_bad"], "key.json is not UTF-8 text"),
    ("seqkd cache key a list", [*_SEQKD, "--seqkd_cache", "{d}/seqkd_list"], "key.json must hold a JSON mapping"),
]
CASES = FILE_CASES + OPTION_CASES + FILE_LAYER_CASES


def _one_error(capsys, argv):
    rc = cli_main(argv)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("error:")], err


def test_the_table_is_large():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,extra,needle", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_error_and_changes_nothing(assets, tmp_path, capsys, name, extra, needle):  # noqa: F811
    if name == "flash-attn missing":
        pytest.skip("covered by tests/test_gradient_checkpointing.py")
    extra = [e.replace("{d}", str(assets)) for e in extra]
    prev = assets / "previous_run"
    inputs_before = {k: v for k, v in _snapshot(assets).items() if not k.startswith("previous_run")}
    before = _snapshot(prev)
    rc, lines, err = _one_error(capsys, _args(assets, prev, "--overwrite_output_dir", *extra))
    assert rc == 2 and len(lines) == 1 and needle in lines[0], (lines, err[-1500:])
    assert "Traceback" not in err
    assert _snapshot(prev) == before
    fresh = tmp_path / "new_run"
    rc, lines, err = _one_error(capsys, _args(assets, fresh, *extra))
    assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, lines
    assert not fresh.exists()
    after = {k: v for k, v in _snapshot(assets).items() if not k.startswith("previous_run")}
    assert after == inputs_before  # the inputs too (data, configs, model folders) are untouched

"""The README's "Writing a method" example (examples/logit_mse.py) is the code shown there, and it trains."""
import importlib.util
import json
import math
import os

import pytest

import tiny
from kd_engine.config import build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "logit_mse.py")


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("cache")))


def test_readme_shows_the_tested_example():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    code = open(EXAMPLE, encoding="utf-8").read()
    assert f"```python\n{code}```" in readme


@pytest.mark.slow
def test_example_method_trains_and_reports_perplexities(tmp_path):
    from kd_engine.engine.trainer import Trainer

    spec = importlib.util.spec_from_file_location("logit_mse_example", EXAMPLE)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers "logit_mse"
    tiny.make_llama(str(tmp_path / "teacher"), layers=2)
    tiny.write_lines(str(tmp_path / "train.txt"), tiny.sentences(40))
    out = tmp_path / "out"
    tr = Trainer(build_config([
        "--method", "logit_mse", "--teacher", str(tmp_path / "teacher"), "--student.layers", "1",
        "--train_file", str(tmp_path / "train.txt"), "--eval_split", "0.2", "--output_dir", str(out),
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
        "--mse_weight", "0.5", "--disable_tqdm", "true", "--export", "false"]))
    metrics = tr.fit()
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["lm_loss"]))
    assert metrics["teacher_perplexity"] == pytest.approx(math.exp(metrics["teacher_lm_loss"]))
    log = [json.loads(line) for line in open(out / "train_log.jsonl") if '"train"' in line]
    assert len(log) == 3 and all(r["loss"] == pytest.approx(r["mse"] + r["lm"]) for r in log)
    assert all(r["teacher_ms"] > 0 for r in log)  # the teacher's forward was timed by the engine

"""What the training loop logs, and when: windows of logging_steps averaged without per-step host syncs, the lr of
the step just taken, the gradient norm on logged steps, and the CLI's last lines."""
import json

import pytest

import tiny
from kd_engine.cli import main as cli_main
from kd_engine.config import build_config


@pytest.fixture(scope="module", autouse=True)
def _single_process_env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    tiny.make_llama(str(d / "teacher"), layers=4)
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(48))
    tiny.write_lines(str(d / "eval.txt"), tiny.sentences(8, seed=1))
    return d


def _argv(assets, out, *extra):
    return ["--method", "kd", "--teacher", str(assets / "teacher"), "--student.layers", "2",
            "--train_file", str(assets / "train.txt"), "--output_dir", str(out), "--max_steps", "4",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--disable_tqdm", "true",
            "--export", "false", *extra]


def _train_log(out):
    return [json.loads(line) for line in open(out / "train_log.jsonl") if json.loads(line)["split"] == "train"]


def test_logged_window_means_grad_norm_and_lr_of_the_step_taken(assets, tmp_path):
    from kd_engine.engine.trainer import Trainer

    every = _train_log_of(Trainer, assets, tmp_path / "every", "1")
    pairs = _train_log_of(Trainer, assets, tmp_path / "pairs", "2")
    assert [r["step"] for r in every] == [1, 2, 3, 4] and [r["step"] for r in pairs] == [2, 4]
    for r in pairs:  # the window mean of the per-step losses; the gradient norm of the logged step itself
        k = r["step"]
        assert r["loss"] == pytest.approx((every[k - 2]["loss"] + every[k - 1]["loss"]) / 2, rel=1e-6)
        assert r["grad_norm"] == pytest.approx(every[k - 1]["grad_norm"], rel=1e-6)
    # linear decay, no warm-up: step k (1-based) trains with lr * (1 - (k - 1) / 4); that is the lr logged at k
    assert [r["lr"] for r in every] == pytest.approx([1e-2 * (1 - k / 4) for k in range(4)])


def _train_log_of(trainer_cls, assets, out, logging_steps):
    trainer_cls(build_config(_argv(assets, out, "--logging_steps", logging_steps,
                                   "--lr_scheduler_type", "linear", "--warmup_steps", "0"))).fit()
    return _train_log(out)


def test_cli_last_lines_without_and_with_evaluation(assets, tmp_path, capsys):
    """One last line: where the student went and the metrics, never an empty metrics list."""
    assert cli_main(_argv(assets, tmp_path / "noeval", "--max_steps", "1")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert not any(line.startswith("final metrics:") for line in lines)  # no empty metrics line
    assert lines[-1].startswith(f"done: 1 steps; checkpoints in {tmp_path / 'noeval' / 'checkpoints'}; ")
    assert lines[-1].endswith("no evaluation data")
    assert cli_main(_argv(assets, tmp_path / "eval", "--max_steps", "1", "--eval_file",
                          str(assets / "eval.txt"))) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(f"done: 1 steps; checkpoints in {tmp_path / 'eval' / 'checkpoints'}; ")
    assert "lm_loss=" in lines[-1]


def test_kd_help_names_the_recipe_of_each_default():
    from kd_engine.config import help_text

    lines = {ln.split()[0]: ln for ln in help_text("kd").splitlines() if ln.strip().startswith("--")}
    assert "default: 2.0" in lines["--temperature"] and "classification" in lines["--temperature"] \
        and "LM recipes use 1.0" in lines["--temperature"]
    assert "default: 0.5" in lines["--alpha"] and "recipe" in lines["--alpha"]

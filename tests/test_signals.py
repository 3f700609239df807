"""Stop signals (checkpoint at a step boundary, exit 75), --resume auto, restart count; bad input. One process,
real DeepSpeed, real signals (os.kill); the SLURM cluster runs are in test_slurm.py."""
import json
import os
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import tiny
from kd_engine.cli import main as cli_main
from kd_engine.config import build_config
from kd_engine.engine import autoresume, signals
from kd_engine.errors import KDError


@pytest.fixture(scope="module", autouse=True)
def _single_process_env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sig_assets")
    tiny.make_llama(str(d / "teacher"), layers=4, dropout=0.1)  # dropout: the RNG state must survive the stop
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(48))
    tiny.write_lines(str(d / "eval.txt"), tiny.sentences(8, seed=1))
    return d


def argv(assets, out, *extra):
    return ["--method", "kd", "--teacher", str(assets / "teacher"), "--student.layers", "2",
            "--train_file", str(assets / "train.txt"), "--eval_file", str(assets / "eval.txt"),
            "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--disable_tqdm", "true", *extra]


def trainer_for(args):
    from kd_engine.engine.trainer import Trainer

    return Trainer(build_config(args))


def signal_during(tr, method_name: str, at_step: int, sig=signal.SIGUSR1):
    """Deliver a real signal to this process while ``tr.<method_name>`` runs at ``at_step``."""
    holder = tr.method if method_name == "train_step" else tr
    orig = getattr(holder, method_name)

    def wrapped(*a, **k):
        if tr.global_step == at_step:
            os.kill(os.getpid(), sig)
        return orig(*a, **k)

    setattr(holder, method_name, wrapped)


def weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def train_steps(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "train_log.jsonl"))
            if json.loads(line)["split"] == "train"]


def test_signal_stops_at_step_boundary_and_auto_resume_is_exact(assets, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    trainer_for(argv(assets, ref)).fit()
    tr = trainer_for(argv(assets, stopped, "--resume", "auto"))
    signal_during(tr, "train_step", at_step=2)  # arrives during step 3: seen at the boundary after it
    with pytest.raises(signals.Stopped) as exc:
        tr.fit()
    assert exc.value.step == 3 and not exc.value.requeued and exc.value.signame == "SIGUSR1"
    assert sorted(os.listdir(stopped / "checkpoints")) == ["step-00000003"] and not (stopped / "final").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored after fit
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    tr2 = trainer_for(argv(assets, stopped, "--resume", "auto"))  # the same command line resumes
    tr2.fit()
    assert tr2.global_step == 6
    wa, wb = weights(ref), weights(stopped)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert train_steps(stopped) == [1, 2, 3, 4, 5, 6]  # no duplicate, no missing step
    # TensorBoard: the same curve continues; the restart count is logged at the resumed step
    acc = EventAccumulator(str(stopped / "tensorboard" / "train"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [(e.step, e.value) for e in acc.Scalars("run/restart_count")] == [(0, 0.0), (3, 1.0)]


def test_signal_during_checkpoint_write_finishes_the_write(assets, tmp_path):
    out = tmp_path / "o"
    tr = trainer_for(argv(assets, out, "--save_steps", "2", "--stop_signals", "TERM"))
    signal_during(tr, "_save", at_step=2, sig=signal.SIGTERM)
    with pytest.raises(signals.Stopped) as exc:
        tr.fit()
    assert exc.value.step == 2 and exc.value.signame == "SIGTERM"
    ck = out / "checkpoints" / "step-00000002"
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002"] and (ck / "COMPLETE").is_file()


def test_cli_exit_code_on_stop(assets, tmp_path, capsys):
    from kd_engine.engine import trainer as trainer_mod

    orig = trainer_mod.Trainer._setup

    def setup_then_signal(self):
        orig(self)
        os.kill(os.getpid(), signal.SIGUSR1)

    trainer_mod.Trainer._setup = setup_then_signal
    try:
        rc = cli_main(argv(assets, tmp_path / "o"))
    finally:
        trainer_mod.Trainer._setup = orig
    err = capsys.readouterr().err
    assert rc == signals.EXIT_STOPPED == 75
    assert "stopped by SIGUSR1 at step 0" in err and "not requeued" in err


# ---- --resume auto decisions (no training) --------------------------------------------------------------
def _cfg(out, *extra):
    return build_config(["--method", "kd", "--teacher", "t", "--output_dir", str(out), "--resume", "auto",
                         *extra]).train


def test_resume_auto_modes(tmp_path):
    from kd_engine.config import to_dict
    from kd_engine.engine import checkpoint

    out = tmp_path / "run"
    assert autoresume.run_mode(_cfg(out)) == "fresh"
    out.mkdir()
    assert autoresume.run_mode(_cfg(out)) == "fresh"
    checkpoint.write_run_marker(str(out), {"method": "kd", "config": to_dict(_cfg(out))})
    assert autoresume.run_mode(_cfg(out)) == "overwrite"  # our own start that never reached a checkpoint
    ck = out / "checkpoints" / "step-00000004"
    ck.mkdir(parents=True)
    assert autoresume.run_mode(_cfg(out)) == "overwrite"  # incomplete checkpoint: not resumable
    from kd_engine.engine import manifest
    from kd_engine.io import write_text

    (ck / "COMPLETE").write_text(json.dumps({"manifest_sha256": manifest.write(str(ck), write_text)}))
    assert autoresume.run_mode(_cfg(out, "--max_steps", "99")) == "resume"  # run length may change
    with pytest.raises(KDError, match="holds another run .student"):
        autoresume.run_mode(_cfg(out, "--student.layers", "3"))
    with pytest.raises(KDError, match="holds another run .method"):
        autoresume.run_mode(build_config(["--method", "sft", "--student", "s", "--output_dir", str(out),
                                          "--resume"]).train)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(KDError, match="other files"):
        autoresume.run_mode(_cfg(foreign))
    assert (foreign / "notes.txt").read_text() == "mine"


# ---- bad input: one clear error line, exit 2, nothing written ----------------------------------------------
def test_bad_stop_signal_and_resume_values(assets, tmp_path, capsys):
    for extra, msg in [(["--stop_signals", "USR1,SIGNOPE"], "'SIGNOPE' is not a signal"),
                       (["--stop_signals", "KILL"], "'KILL' is not a signal that can be caught"),
                       (["--resume", "sometimes"], "resume must be one of false, true, auto")]:
        rc = cli_main(argv(assets, tmp_path / "o", *extra))
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.startswith("error: "), err
        assert not (tmp_path / "o").exists()


def test_resume_auto_refuses_another_run_and_keeps_it(assets, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli_main(argv(assets, out, "--max_steps", "1")) == 0
    before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(out) for p in fs}
    rc = cli_main(argv(assets, out, "--resume", "auto", "--student.layers", "1"))
    err = capsys.readouterr().err
    assert rc == 2 and "holds another run (student" in err
    rc = cli_main(["--method", "sft", "--student", str(assets / "teacher"), "--train_file",
                   str(assets / "train.txt"), "--output_dir", str(out), "--resume", "--disable_tqdm", "true"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds another run (method is 'kd' there, 'sft' here" in err
    after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(out) for p in fs}
    assert after == before


def test_sbatch_outside_an_allocation_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", "scripts/slurm/train.sbatch", "--method", "kd"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: train.sbatch runs inside a SLURM allocation")
    assert not os.path.exists("outputs/kd_engine-") and r.stdout == ""

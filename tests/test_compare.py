"""python -m kd_engine.compare end to end on tiny models: every cell trained and evaluated, the report's statistics,
a second run that reruns nothing, a killed cell that resumes from its checkpoint, the evaluators and the paired
bootstrap against hand-made cases, and bad specs (exit 2, one error line, nothing written)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import tiny
from kd_engine.compare.__main__ import main as compare_main
from kd_engine.compare.stats import paired_interval


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare_assets")
    tiny.make_bert_classifier(str(d / "teacher"), layers=2)
    tiny.write_classification_tsv(str(d / "train.tsv"), 32, seed=1)
    tiny.write_classification_tsv(str(d / "dev.tsv"), 24, seed=2)
    tiny.make_llama(str(d / "lm"), layers=1)
    tiny.write_lines(str(d / "text.txt"), tiny.sentences(12, seed=3))
    return d


def _spec(assets, out, **over):
    spec = {"output_dir": str(out),
            "base": {"teacher": str(assets / "teacher"), "student": {"layers": 1}, "train_file": str(assets / "train.tsv"),
                     "text_column": "sentence", "label_column": "label", "max_steps": 3,
                     "per_device_train_batch_size": 4, "learning_rate": 1e-3},
            "rows": [{"name": "sft", "method": "sft"}, {"name": "kd", "method": "kd", "options": {"alpha": 0.5}}],
            "seeds": [0, 1], "baseline": "sft",
            "evaluator": {"kind": "accuracy", "file": str(assets / "dev.tsv"), "text_column": "sentence"}}
    spec.update(over)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _env(tmp_path):
    return tiny.cpu_env({"KD_ENGINE_CACHE": str(tmp_path / "cache")})


def _compare(args, tmp_path, **kw):
    return subprocess.run([sys.executable, "-m", "kd_engine.compare", *args], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.mark.slow
def test_grid_runs_every_cell_reports_intervals_and_a_rerun_redoes_nothing(assets, tmp_path):
    out = tmp_path / "cmp"
    spec = _spec(assets, out)
    r = _compare([spec], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith("compare: 4/4 cells done; report in")
    rep = json.load(open(out / "compare.json"))
    assert [row["row"] for row in rep["rows"]] == ["sft", "kd"] and rep["missing_cells"] == []
    for row in rep["rows"]:
        assert row["seeds"] == [0, 1] and all(0.0 <= v <= 1.0 for v in row["values"])
    kd = rep["rows"][1]
    lo, hi = kd["interval_95"]
    assert lo <= kd["diff_vs_baseline"] <= hi and "paired bootstrap over 24 examples x 2 seed(s)" in kd["interval_how"]
    md = open(out / "compare.md").read()
    assert "| kd | kd |" in md and "vs sft (95 % interval)" in md
    assert os.path.getsize(out / "compare.png") > 1000
    for cell in ("sft-seed0", "sft-seed1", "kd-seed0", "kd-seed1"):  # each one its own seeded, exported run
        assert (out / "cells" / cell / "final" / "config.json").is_file()
        assert json.load(open(out / "cells" / cell / "kd_run.json"))["config"]["seed"] == int(cell[-1])
    stamps = {c: os.path.getmtime(out / "cells" / c / "compare_eval.json") for c in os.listdir(out / "cells")}
    again = _compare([spec], tmp_path)
    assert again.returncode == 0 and again.stdout.count("finished before") == 4
    assert stamps == {c: os.path.getmtime(out / "cells" / c / "compare_eval.json") for c in stamps}


@pytest.mark.slow
def test_a_killed_cell_resumes_from_its_checkpoint(assets, tmp_path):
    out = tmp_path / "cmp"
    base = {"teacher": str(assets / "lm"), "student": {"layers": 1}, "train_file": str(assets / "text.txt"),
            "max_steps": 40, "per_device_train_batch_size": 2, "save_steps": 2, "learning_rate": 1e-3}
    spec = _spec(assets, out, base=base, rows=[{"name": "kd", "method": "kd"}], seeds=[0], baseline="kd",
                 evaluator={"kind": "bits_per_byte", "file": str(assets / "text.txt")})
    p = subprocess.Popen([sys.executable, "-m", "kd_engine.compare", spec], env=_env(tmp_path),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = out / "cells" / "kd-seed0" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.is_dir() and any(n >= "step-00000004" for n in os.listdir(ckpts))):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "cells" / "kd-seed0" / "final").exists()
    r = _compare([spec], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + (out / "logs" / "kd-seed0.log").read_text()[-3000:]
    log = [json.loads(x) for x in open(out / "cells" / "kd-seed0" / "train_log.jsonl")]
    runs = [x for x in log if x["split"] == "run"]
    assert len(runs) == 2  # the killed start and the resumed one
    steps = [x["step"] for x in log if x["split"] == "train"]
    resumed_at = log.index(runs[1])
    assert min(x["step"] for x in log[resumed_at + 1:] if x["split"] == "train") > 2  # from a checkpoint, not step 1
    assert max(steps) == 40
    res = json.load(open(out / "cells" / "kd-seed0" / "compare_eval.json"))
    assert res["kind"] == "bits_per_byte" and 0 < res["value"] < 30


def test_paired_bootstrap_on_hand_made_cases():
    same = {0: {"value": 0.5, "parts": [[1, 1], [0, 1]] * 10}, 1: {"value": 0.5, "parts": [[0, 1], [1, 1]] * 10}}
    lo, hi, how = paired_interval(same, same, "accuracy", 500)
    assert lo == hi == 0.0 and "20 examples x 2 seed(s)" in how
    better = {s: {"value": 1.0, "parts": [[1, 1]] * 20} for s in (0, 1)}
    lo, hi, _ = paired_interval(better, same, "accuracy", 500)
    assert 0.0 < lo <= 0.5 <= hi  # every example right vs half: the difference is 0.5 give or take resampling
    no_parts = {s: {"value": v, "parts": None} for s, v in ((0, 1.0), (1, 2.0), (2, 3.0))}
    base = {s: {"value": 0.0, "parts": None} for s in (0, 1, 2)}
    lo, hi, how = paired_interval(no_parts, base, "python", 500)
    assert 1.0 <= lo <= hi <= 3.0 and "3 paired seeds" in how


def test_bits_per_byte_evaluator_equals_the_hand_computation(assets):
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd_engine.compare.evaluate import check_evaluator, evaluate

    ev = check_evaluator({"kind": "bits_per_byte", "file": str(assets / "text.txt")}, "test")
    res = evaluate(ev, str(assets / "lm"))
    tok, model = AutoTokenizer.from_pretrained(assets / "lm"), AutoModelForCausalLM.from_pretrained(assets / "lm")
    nll = n_bytes = 0.0
    for text in open(assets / "text.txt").read().splitlines():
        ids = tok(text)["input_ids"]  # the tiny tokenizer adds <s> itself
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        nll -= float(lp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
        n_bytes += len(text.encode())
    assert res["value"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    assert len(res["parts"]) == 12


@pytest.mark.parametrize("change,needle", [
    ({"rows": [{"name": "a", "method": "kdd"}], "baseline": "a"}, "cell a-seed0: unknown method 'kdd'"),
    ({"rows": [{"name": "a", "method": "kd", "options": {"learning_rat": 1}}], "baseline": "a"},
     "did you mean 'learning_rate'"),
    ({"rows": [{"name": "a", "method": "kd"}, {"name": "b", "method": "kd"}]}, "row 'b' repeats row 'a'"),
    ({"baseline": "nope"}, "baseline 'nope' is not a row"),
    ({"evaluator": {"kind": "python", "function": "no_such_module:f"}}, "cannot be loaded"),
    ({"evaluator": {"kind": "accuracy", "file": "missing.tsv"}}, "file 'missing.tsv' does not exist"),
    ({"evaluator": {"kind": "acuracy", "file": "x"}}, "kind must be one of"),
    ({"seed": [0]}, "unknown key 'seed'; did you mean 'seeds'?"),
    ({"seeds": [0, 0]}, "distinct integers"),
])
def test_bad_specs_exit_2_with_one_error_and_write_nothing(assets, tmp_path, capsys, change, needle):
    out = tmp_path / "cmp"
    spec = _spec(assets, out, **change)
    assert compare_main([spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([x for x in err if x.startswith("error:")]) == 1 and needle in err[-1], err[-3:]
    assert not out.exists()


def test_dry_run_lists_the_cells_and_writes_nothing(assets, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare_main([_spec(assets, out), "--dry_run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [x.split(":")[1].strip() for x in lines] == ["sft-seed0", "sft-seed1", "kd-seed0", "kd-seed1"]
    assert "--seed 1" in lines[1] and "--alpha 0.5" in lines[2]
    assert not out.exists()


def test_seed_and_output_dir_placeholders_and_list_options(assets, tmp_path):
    """{seed} / {output_dir} in an option become the cell's; a list option reaches the CLI as its comma list."""
    from kd_engine.compare.spec import load_spec

    out = tmp_path / "cmp"
    rows = [{"name": "sft", "method": "sft"},
            {"name": "kd2", "method": "kd", "options": {"tokenizer": "{output_dir}/cells/sft-seed{seed}/final",
                                                        "stop_signals": ["USR1", "INT"]}}]
    spec = load_spec(_spec(assets, out, rows=rows))
    kd1 = next(c for c in spec.cells if c.name == "kd2-seed1")
    argv = list(kd1.argv)
    assert argv[argv.index("--tokenizer") + 1] == f"{out}/cells/sft-seed1/final"
    assert argv[argv.index("--stop_signals") + 1] == "USR1,INT"
    from kd_engine.config import build_config

    assert build_config(argv).train.stop_signals == ["USR1", "INT"]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.multirank
def test_slurm_array_runs_the_cells_and_the_report_job_after_them(assets, tmp_path):
    """--slurm on the real local cluster: one array task per cell, then the report job (afterany)."""
    import re

    import slurm_cluster

    c, reason = slurm_cluster.start()
    if c is None:
        pytest.skip(f"no local SLURM cluster: {reason}")
    try:
        out = tmp_path / "cmp"
        spec = _spec(assets, out, seeds=[0])
        env = {**_env(tmp_path), "SLURM_CONF": c.env["SLURM_CONF"], "PYTHONPATH": os.getcwd()}
        r = subprocess.run([sys.executable, "-m", "kd_engine.compare", spec, "--slurm"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        report_job = re.search(r"report job (\d+)", r.stdout).group(1)
        assert re.search(r"array job \d+ \(2 cells\)", r.stdout)
        assert c.wait(report_job, timeout=500)["JobState"] == "COMPLETED"
        rep = json.load(open(out / "compare.json"))
        assert rep["missing_cells"] == [] and [row["seeds"] for row in rep["rows"]] == [[0], [0]]
        assert (out / "logs" / "array-0.out").is_file() and (out / "logs" / "array-1.out").is_file()
    finally:
        slurm_cluster.stop(c)

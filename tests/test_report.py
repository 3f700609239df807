"""python -m kd_engine.report: figures from train_log.jsonl; bad input exits 2 and writes nothing."""
import json

import pytest

from kd_engine.report import main


def _log(d, rows):
    d.mkdir(parents=True, exist_ok=True)
    (d / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(n=6):
    rows = [{"step": s, "split": "train", "loss": 3.0 / s, "kd": 2.0 / s, "ce": 1.0 / s, "lr": 1e-3 * s / n,
             "grad_norm": 1.0, "samples_per_s": 4.0, "tokens_per_s": 100.0, "teacher_ms": 40.0, "student_ms": 60.0}
            for s in range(1, n + 1)]
    rows += [{"step": s, "split": "eval", "lm_loss": 3.0 - 0.1 * s, "accuracy": 0.1 * s} for s in (3, 6)]
    return rows


def test_report_writes_the_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the [plots] extra (matplotlib) is not installed")
    from PIL import Image

    _log(tmp_path / "run", _rows())
    assert main([str(tmp_path / "run")]) == 0
    figs = sorted(p.name for p in (tmp_path / "run" / "figures").iterdir())
    assert figs == ["eval.png", "loss_terms.png", "lr.png", "time_share.png"]
    for name in figs:
        w, h = Image.open(tmp_path / "run" / "figures" / name).size
        assert w > 300 and h > 200
    assert "4 figures in" in capsys.readouterr().out
    # no teacher timing and no eval: only the figures that have data
    _log(tmp_path / "run2", [{k: v for k, v in r.items() if k != "teacher_ms"} for r in _rows() if r["split"] == "train"])
    assert main([str(tmp_path / "run2")]) == 0
    assert sorted(p.name for p in (tmp_path / "run2" / "figures").iterdir()) == ["loss_terms.png", "lr.png"]


@pytest.mark.parametrize("case", ["missing", "no_log", "empty", "not_json"])
def test_bad_input_exit_2_nothing_written(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "empty":
        (run / "train_log.jsonl").write_text("")
    if case == "not_json":
        (run / "train_log.jsonl").write_text("{oops\n")
    before = sorted(p.name for p in run.iterdir()) if run.exists() else None
    assert main([str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert (sorted(p.name for p in run.iterdir()) if run.exists() else None) == before

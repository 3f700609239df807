"""Cross-tokenizer distillation, measured: held-out bits per byte of students trained with CE only, ULD, the hybrid
(``xtoken_kd``) and, as the reference point, same-tokenizer KD, on the same text, steps and seeds.

Teacher: SmolLM2-135M (``offline:smollm2-135m``, 49,152-token byte-level BPE). Students: random Llamas (``--hidden``,
``--layers``, tied embeddings) with

- a byte-level BPE of ``--bpe_vocab`` tokens trained here with ``tokenizers`` on the training side of the text
  (``ce``, ``uld``, ``xtoken_kd``). Why a BPE and not all-MiniLM's WordPiece: bits per byte compares models across
  tokenizers only when both tokenizers are lossless; uncased WordPiece discards case, accents and whitespace, so a
  model over it would be scored on less information than the teacher (a lower bpb for predicting less);
- the teacher's own tokenizer (``same_tok_kd``: ``xtoken_kd`` with one tokenizer on both sides, which is kd's loss,
  ``tests/test_xtoken_method.py``); a bigger student (its embedding is 49,152 rows).

Training text: pieces of about ``--piece_chars`` characters of the Wikipedia sample (``../shared/data/enwiki_2015_
sample``); held-out text: WikiText-2 validation paragraphs (``wikitext-2-raw/wiki.valid.raw``, never trained on), cut
at a word boundary to ``--eval_chars`` characters so neither tokenizer truncates. Metrics, computed here on the
exported students (the same code for every run): ``bpb`` = summed NLL of every text token (after one start token) /
(ln 2 x UTF-8 bytes); ``next_word_agreement`` = share of held-out word starts (common cuts of both tokenizations
followed by a new word) where the student's and the teacher's top-1 next tokens spell the same word.

    nice -n 5 python benchmarks/cross_tokenizer.py                 # 3 seeds x 4 methods (~70 min on 2 cores, measured)
    python benchmarks/cross_tokenizer.py --steps 20 --seeds 1      # quick

Last line: JSON with ``bpb`` (mean, std per method), ``next_word_agreement``, ``xtoken_gain_vs_ce`` (bpb of CE-only
minus the best cross-tokenizer method's); also ``benchmarks/results/NAME.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import RESULTS, ROOT, single_rank_env

TEACHER = "offline:smollm2-135m"
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
METHODS = ("ce", "uld", "xtoken_kd", "same_tok_kd")


def _pieces(docs, size: int, limit: int) -> list[str]:
    out = []
    for doc in docs:
        for para in doc.split("\n"):
            words, cur = para.split(), []
            for w in words:
                cur.append(w)
                if sum(len(x) + 1 for x in cur) >= size:
                    out.append(" ".join(cur))
                    cur = []
                    if len(out) >= limit:
                        return out
    return out


def _heldout(n: int, chars: int) -> list[str]:
    path = os.path.join(SHARED, "wikitext-2-raw", "wiki.valid.raw")
    out = []
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if len(line) < chars or line.startswith("="):
            continue
        cut = line[:chars]
        out.append(cut[:cut.rfind(" ")] if " " in cut else cut)
        if len(out) >= n:
            break
    return out


def _make_students(tmp: str, train_texts: list[str], args) -> dict[str, str]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kd_engine.models.loading import load_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train_texts, trainers.BpeTrainer(
        vocab_size=args.bpe_vocab, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    bpe = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    teacher_tok = load_tokenizer(TEACHER)
    out = {}
    for name, t in (("bpe", bpe), ("teacher_tok", teacher_tok)):
        pad = t.pad_token_id if t.pad_token_id is not None else t.eos_token_id
        cfg = LlamaConfig(vocab_size=len(t), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                          num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                          num_key_value_heads=args.hidden // 64, max_position_embeddings=512, pad_token_id=pad,
                          bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, tie_word_embeddings=True)
        import torch

        torch.manual_seed(0)
        path = os.path.join(tmp, f"student_{name}")
        LlamaForCausalLM(cfg).save_pretrained(path)
        t.save_pretrained(path)
        out[name] = path
    return out


def _train(method: str, seed: int, students: dict, train_file: str, out: str, args, port: int) -> float:
    student = students["teacher_tok" if method == "same_tok_kd" else "bpe"]
    common = ["--student", student, "--train_file", train_file, "--max_length", str(args.max_length),
              "--per_device_train_batch_size", str(args.batch), "--max_steps", str(args.steps), "--seed", str(seed),
              "--learning_rate", str(args.lr), "--lr_scheduler_type", "cosine", "--warmup_steps",
              str(max(args.steps // 10, 1)), "--logging_steps", "10", "--output_dir", out, "--disable_tqdm", "true",
              "--report_to", "none", "--save_steps", "0"]
    if method == "ce":
        extra = ["--method", "sft", "--task", "causal_lm"]
    elif method == "uld":
        extra = ["--method", "uld", "--teacher", TEACHER]
    else:
        extra = ["--method", "xtoken_kd", "--teacher", TEACHER]
    t0 = time.time()
    p = subprocess.run([sys.executable, "launch/train.py", *extra, *common], env=single_rank_env(
        port, DS_ACCELERATOR="cpu"), capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed:\n{p.stdout[-1500:]}\n{p.stderr[-3000:]}")
    return time.time() - t0


def _evaluate(model_dir: str, texts: list[str], teacher, teacher_top: dict) -> dict:
    """bpb and next-word agreement of the student in ``model_dir`` on ``texts`` (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kd_engine.data.vocab_map import word_ids
    from kd_engine.data.xtoken import PairCollator, pair_texts
    from kd_engine.models.loading import load_tokenizer

    s_tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    t_tok = teacher_top["tok"]
    examples = pair_texts(texts, s_tok, t_tok, 512, "held-out text")
    assert len(examples) == len(texts), "a held-out text did not align"
    table: dict = {}
    t_word, s_word = word_ids(t_tok, table), word_ids(s_tok, table)
    collate = PairCollator(s_tok.pad_token_id, t_tok.pad_token_id)
    nll = n_bytes = agree = n_words = 0.0
    with torch.no_grad():
        for lo in range(0, len(examples), 8):
            batch = collate(examples[lo:lo + 8])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            lp = torch.log_softmax(logits[:, :-1, :len(s_tok)], -1)
            lab = batch["labels"][:, 1:]
            m = lab != -100
            nll -= float(lp.gather(-1, lab.clamp(min=0)[..., None])[..., 0][m].sum())
            n_bytes += float(batch["n_bytes"].sum())
            t_top = teacher_top["top"][lo:lo + 8]
            for i in range(batch["input_ids"].shape[0]):
                for s0, t0, w in zip(batch["span_s0"][i].tolist(), batch["span_t0"][i].tolist(),
                                     batch["span_word"][i].tolist()):
                    if s0 < 0 or not w:
                        continue
                    sw, tw = int(s_word[int(logits[i, s0 - 1].argmax())]), int(t_word[t_top[i][t0 - 1]])
                    agree += float(sw == tw and sw >= 0)
                    n_words += 1
    return {"bpb": nll / (math.log(2) * n_bytes), "next_word_agreement": agree / max(n_words, 1),
            "word_starts": int(n_words), "bytes": int(n_bytes)}


def _teacher_tops(texts: list[str], teacher, t_tok) -> dict:
    """The teacher's top-1 token at every row of every held-out text (its own tokenization), and its bpb."""
    import torch

    from kd_engine.data.xtoken import encode_side

    tops, nll, n_bytes = [], 0.0, 0
    with torch.no_grad():
        for text, (ids, offs) in zip(texts, encode_side(t_tok, texts, 512)):
            logits = teacher(input_ids=torch.tensor([ids])).logits[0].float()
            tops.append(logits.argmax(-1).tolist())
            lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            nll -= float(lp.sum())
            n_bytes += len(text[:max(b for a, b in offs)].encode())
    return {"tok": t_tok, "top": tops, "bpb": nll / (math.log(2) * n_bytes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=8, help="rows per step")
    ap.add_argument("--max_length", type=int, default=64, help="tokens per row (each tokenizer its own)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per method (0, 1, ...)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine, 10%% warm-up)")
    ap.add_argument("--hidden", type=int, default=384, help="student width (heads of 64)")
    ap.add_argument("--layers", type=int, default=4, help="student depth")
    ap.add_argument("--bpe_vocab", type=int, default=8192, help="the BPE student's vocabulary")
    ap.add_argument("--piece_chars", type=int, default=240, help="characters per training piece")
    ap.add_argument("--train_pieces", type=int, default=3000, help="training pieces")
    ap.add_argument("--eval_texts", type=int, default=120, help="held-out WikiText-2 paragraphs")
    ap.add_argument("--eval_chars", type=int, default=400, help="characters per held-out paragraph")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--name", default="cross_tokenizer", help="results file name under benchmarks/results/")
    args = ap.parse_args()
    if not os.path.isdir(SHARED):
        print(f"error: {SHARED} is missing (the shared data sets)", file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    from kd_engine.data.corpus_read import iter_documents, resolve_files
    from kd_engine.models.loading import load_model, load_tokenizer

    methods = [m for m in args.methods.split(",") if m]
    files = resolve_files(os.path.join(SHARED, "enwiki_2015_sample"))
    train_texts = _pieces(iter_documents(files, "wiki"), args.piece_chars, args.train_pieces)
    heldout = _heldout(args.eval_texts, args.eval_chars)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        train_file = os.path.join(tmp, "train.txt")
        with open(train_file, "w", encoding="utf-8") as f:
            f.write("\n".join(train_texts) + "\n")
        students = _make_students(tmp, train_texts, args)
        t_tok = load_tokenizer(TEACHER)
        teacher = load_model(TEACHER, "causal_lm").eval()
        tops = _teacher_tops(heldout, teacher, t_tok)
        print(f"teacher bpb on held-out text: {tops['bpb']:.4f}", flush=True)
        for seed in range(args.seeds):
            for i, m in enumerate(methods):
                out = os.path.join(tmp, f"{m}-{seed}")
                secs = _train(m, seed, students, train_file, out, args, 29800 + 10 * seed + i)
                r = _evaluate(os.path.join(out, "final"), heldout, teacher, tops)
                r["train_s"] = round(secs, 1)
                results[m].append(r)
                print(f"seed {seed} {m}: bpb {r['bpb']:.4f} agreement {r['next_word_agreement']:.3f} "
                      f"({secs:.0f} s)", flush=True)

    def stat(m, k):
        v = [r[k] for r in results[m]]
        return {"mean": round(statistics.mean(v), 4), "std": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0,
                "runs": [round(x, 4) for x in v]}

    bpb = {m: stat(m, "bpb") for m in methods}
    agree = {m: stat(m, "next_word_agreement") for m in methods}
    cross = [m for m in ("uld", "xtoken_kd") if m in methods]
    summary = {"benchmark": "cross_tokenizer", "teacher": TEACHER, "teacher_bpb": round(tops["bpb"], 4),
               "steps": args.steps, "batch": args.batch, "max_length": args.max_length, "seeds": args.seeds,
               "student": {"hidden": args.hidden, "layers": args.layers, "bpe_vocab": args.bpe_vocab},
               "train_pieces": len(train_texts), "eval_texts": len(heldout), "bpb": bpb,
               "next_word_agreement": agree,
               "train_s": {m: round(statistics.mean(r["train_s"] for r in results[m]), 1) for m in methods},
               "command": "python benchmarks/cross_tokenizer.py " + " ".join(sys.argv[1:])}
    if "ce" in methods and cross:
        best = min(cross, key=lambda m: bpb[m]["mean"])
        summary["xtoken_best"] = best
        summary["xtoken_gain_vs_ce"] = round(bpb["ce"]["mean"] - bpb[best]["mean"], 4)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
        f.write(f"# Cross-tokenizer distillation: SmolLM2-135M -> {args.layers}x{args.hidden} Llama, {args.steps} "
                f"steps of {args.batch} x {args.max_length} tokens, {args.seeds} seed(s), CPU\n\n"
                f"Held-out: {len(heldout)} WikiText-2 validation paragraphs; teacher bpb {tops['bpb']:.4f}.\n\n"
                "| method | student tokenizer | bits per byte (mean ± std) | next-word agreement | train s/run |\n"
                "|---|---|---|---|---|\n")
        for m in methods:
            tok = "SmolLM2's (49,152)" if m == "same_tok_kd" else f"byte-level BPE ({args.bpe_vocab:,})"
            f.write(f"| {m} | {tok} | {bpb[m]['mean']:.4f} ± {bpb[m]['std']:.4f} | {agree[m]['mean']:.3f} ± "
                    f"{agree[m]['std']:.3f} | {summary['train_s'][m]:.0f} |\n")
        if "xtoken_gain_vs_ce" in summary:
            f.write(f"\nxtoken_gain_vs_ce {summary['xtoken_gain_vs_ce']} (CE-only bpb minus {summary['xtoken_best']}'s; "
                    "positive: distillation across tokenizers helped)\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Step time against the peers: kd_engine's kd step vs TRL's GKDTrainer vs a plain PyTorch loop with fused AdamW,
doing identical forward-KL distillation work, measured side by side.

    python benchmarks/peer_step.py [--steps 8] [--warmup 2] [--layers 10] [--seq 64] [--batch 8] [--threads 2]
                                   [--peers_malloc default|keep]

Same SmolLM2-135M teacher (``offline:smollm2-135m``), same student (``kd_engine.shrink --layers N``, loaded from
one folder by all three), same batches in the same order with the same token masks (kd_engine's own collated
batches are handed to TRL and to the plain loop), fp32, AdamW lr 5e-5 (constant), gradient clipping 1.0,
logging every 5 steps. kd_engine runs ``--method kd --alpha 1 --temperature 1`` through its real ``Trainer.fit``
loop (DeepSpeed ZeRO-0, set up as its CLI sets it up); TRL runs ``GKDTrainer(lmbda=0, beta=0, temperature=1)``
through its ``train()`` loop.

Each loop runs in its own process (as each user would run it: kd_engine's process tunes glibc malloc, see
kd_engine/allocator.py; the peers keep glibc's defaults unless ``--peers_malloc keep``). The processes hand one
turn to each other at every step boundary (kd_engine step k, TRL step k, plain step k, kd_engine step k+1, ...):
only one computes at a time, load drift hits all three alike, and each step time is the wall time from one step
boundary of its loop to the next (everything the loop does, data and logging included). The step-1 losses must
agree (asserted).

Last line printed: {"kd_engine_vs_trl": TRL median step / kd_engine median step (target >= 1.10),
                    "kd_engine_vs_plain_fused": plain median step / kd_engine median step (target >= 0.95)}
Also writes benchmarks/results/peer_step.{json,md}. Needs the bench extra (pip install -e .[bench]).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
NAMES = ("kd_engine", "trl_gkd", "plain_fused")
LR, CLIP, LOG_EVERY = 5e-5, 1.0, 5


class Turns:
    """Strict round-robin among n processes: participant i computes only while it holds the turn."""

    def __init__(self, n: int, ctx):
        self.n = n
        self.sems = [ctx.Semaphore(0) for _ in range(n)]
        self.barrier = ctx.Barrier(n)
        self.done = ctx.Event()
        self.failed = ctx.Event()
        self.ready = ctx.Event()  # kd_engine has written the batches

    def _acquire(self, i: int) -> None:
        while not self.sems[i].acquire(timeout=1.0):
            if self.failed.is_set():
                raise RuntimeError("another participant failed")

    def start(self, i: int) -> None:
        self.barrier.wait(timeout=1800)
        if i != 0:
            self._acquire(i)

    def pass_on(self, i: int) -> None:
        self.sems[(i + 1) % self.n].release()
        self._acquire(i)

    def finish(self, i: int) -> None:
        if i == self.n - 1:
            self.done.set()
        else:
            self.sems[i + 1].release()
        while not self.done.wait(timeout=1.0):
            if self.failed.is_set():
                raise RuntimeError("another participant failed")

    def fail(self) -> None:
        self.failed.set()
        self.barrier.abort()
        self.done.set()


class Clock:
    """Call ``boundary()`` at the start of every step of one loop; records the wall time of ``timed`` steps."""

    def __init__(self, turns: Turns, i: int, timed: int):
        self.turns, self.i, self.timed = turns, i, timed
        self.k, self.t0, self.times = 0, 0.0, []

    def boundary(self) -> None:
        now = time.perf_counter()
        if self.k > self.timed:
            return
        if self.k == 0:
            self.turns.start(self.i)
        else:
            self.times.append(now - self.t0)
            if self.k == self.timed:
                self.k += 1
                self.turns.finish(self.i)
                return
            self.turns.pass_on(self.i)
        self.k += 1
        self.t0 = time.perf_counter()


def build_student(tmp: str, layers: int) -> str:
    from kd_engine.shrink import main as shrink

    out = os.path.join(tmp, "student")
    if shrink(["--teacher", "offline:smollm2-135m", "--layers", str(layers), "--output_dir", out]) not in (0, None):
        raise SystemExit("error: kd_engine.shrink failed")
    return out


def write_corpus(path: str, n: int, seq: int) -> None:
    """n lines of real text (WikiText-2), each long enough to be cut at ``seq`` tokens (no padding anywhere)."""
    src = os.path.join(ROOT, "..", "shared", "data", "wikitext-2-raw", "wiki.valid.raw")
    if not os.path.isfile(src):
        raise SystemExit(f"error: {src} not found (the benchmark needs ../shared/data)")
    words = open(src, encoding="utf-8").read().split()
    per = seq * 2
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(" ".join(words[(i * per) % (len(words) - per):][:per]) + "\n")


def kd_argv(tmp: str, teacher: str, student: str, args, n_steps: int) -> list[str]:
    return ["--method", "kd", "--alpha", "1", "--temperature", "1", "--teacher", teacher, "--student", student,
            "--train_file", os.path.join(tmp, "train.txt"), "--max_length", str(args.seq),
            "--per_device_train_batch_size", str(args.batch), "--max_steps", str(n_steps),
            "--learning_rate", str(LR), "--lr_scheduler_type", "constant", "--max_grad_norm", str(CLIP),
            "--logging_steps", str(LOG_EVERY), "--output_dir", os.path.join(tmp, "kd_out"), "--report_to", "none",
            "--disable_tqdm", "true", "--group_by_length", "false", "--export", "false", "--save_steps", "0"]


def kd_forward_loss(student_logits, teacher_logits, labels):
    """The plain loop's loss, written the obvious way: mean over real next-token rows of KL(p_teacher || q_student)."""
    import torch.nn.functional as F

    mask = labels[:, 1:] != -100
    s = student_logits[:, :-1][mask]
    t = teacher_logits[:, :-1][mask]
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / s.shape[0]


def _child_env(threads: int, keep_malloc: bool) -> None:
    import torch

    if keep_malloc:
        from kd_engine.allocator import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(threads)


def _load_batches(tmp: str) -> list:
    import torch

    return torch.load(os.path.join(tmp, "batches.pt"))


def run_plain(turns, tmp, teacher_dir, student_dir, n_steps, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    _child_env(args.threads, args.peers_malloc == "keep")
    clock = Clock(turns, 2, args.warmup + args.steps)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).train()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            fused=True)
    turns.ready.wait()
    batches = _load_batches(tmp)
    losses = []
    for i in range(n_steps):
        clock.boundary()
        b = batches[i]
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        with torch.inference_mode():
            t_logits = teacher(**inputs).logits
        loss = kd_forward_loss(student(**inputs).logits, t_logits, b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0 or (i + 1) % LOG_EVERY == 0:
            losses.append((i + 1, loss.item()))
    return {"times": clock.times, "losses": losses, "optimizer": "torch.optim.AdamW(fused=True)"}


def run_trl(turns, tmp, teacher_dir, student_dir, n_steps, args) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    _child_env(args.threads, args.peers_malloc == "keep")
    clock = Clock(turns, 1, args.warmup + args.steps)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    turns.ready.wait()
    batches = _load_batches(tmp)
    rows = [{k: b[k][j].tolist() for k in ("input_ids", "attention_mask", "labels")}
            for b in batches for j in range(b["input_ids"].shape[0])]
    losses = []

    def collate(features):
        return {k: torch.tensor([f[k] for f in features]) for k in ("input_ids", "attention_mask", "labels")}

    class Boundary(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.boundary()

    class Trainer(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            step = self.state.global_step + 1
            if step == 1 or step % LOG_EVERY == 0:
                losses.append((step, float(loss.detach())))
            return loss

    cfg = GKDConfig(output_dir=os.path.join(tmp, "trl_out"), lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
                    per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                    max_steps=n_steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                    weight_decay=0.0, max_grad_norm=CLIP, logging_steps=LOG_EVERY, save_strategy="no",
                    eval_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
                    train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True, seed=42,
                    max_length=args.seq)
    trainer = Trainer(model=student, teacher_model=teacher, args=cfg, data_collator=collate,
                      train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=AutoTokenizer.from_pretrained(student_dir), callbacks=[Boundary()])
    trainer.train()
    optim = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    return {"times": clock.times, "losses": losses,
            "optimizer": f"{type(optim).__module__}.{type(optim).__name__} ({cfg.optim}, fused="
                         f"{optim.defaults.get('fused')})"}


def run_kd(turns, tmp, teacher_dir, student_dir, n_steps, args) -> dict:
    """kd_engine as its CLI runs it: setup_environment (CPU accelerator, allocator), Trainer(config).fit()."""
    from kd_engine.dist import free_port, setup_environment

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    setup_environment()
    import torch

    from kd_engine.config import build_config
    from kd_engine.engine.trainer import Trainer

    torch.set_num_threads(args.threads)
    clock = Clock(turns, 0, args.warmup + args.steps)
    tr = Trainer(build_config(kd_argv(tmp, teacher_dir, student_dir, args, n_steps)))
    step_fn, orig_next = tr.method.train_step, tr.next_batch
    losses, seen = [], []

    def next_batch():
        b = orig_next()
        seen.append(b["input_ids"].clone())
        return b

    def train_step(ctx):
        if not turns.ready.is_set():  # first step: hand the batches kd_engine will train on to the peers
            state = tr.sampler.state_dict()
            batches = [tr.collate(tr.data.train, idx) for idx in list(iter(tr.sampler))[:n_steps]]
            tr.sampler.load_state_dict(state)
            torch.save(batches, os.path.join(tmp, "batches.pt"))
            turns.ready.set()
        clock.boundary()
        terms = step_fn(ctx)
        if ctx.global_step == 0 or (ctx.global_step + 1) % LOG_EVERY == 0:
            losses.append((ctx.global_step + 1, float(terms["loss"])))
        return terms

    tr.method.train_step, tr.next_batch = train_step, next_batch
    tr.fit()
    batches = _load_batches(tmp)
    same = all(torch.equal(b["input_ids"], x) for b, x in zip(batches, seen)) and len(seen) == n_steps
    opt = tr.student.optimizer
    return {"times": clock.times, "losses": losses, "same_batches": same,
            "optimizer": f"{type(opt).__module__}.{type(opt).__name__}(fused={opt.defaults.get('fused')})",
            "student_params": sum(p.numel() for p in tr.student.module.parameters()),
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "deepspeed": __import__("deepspeed").__version__, "trl": __import__("trl").__version__}}


def _participant(i, turns, tmp, teacher_dir, student_dir, n_steps, args) -> None:
    try:
        out = (run_kd, run_trl, run_plain)[i](turns, tmp, teacher_dir, student_dir, n_steps, args)
        with open(os.path.join(tmp, f"{NAMES[i]}.json"), "w") as fh:
            json.dump(out, fh)
    except BaseException:
        turns.fail()
        raise


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="timed steps per loop (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps per loop")
    ap.add_argument("--layers", type=int, default=10, help="student depth (kd_engine.shrink of SmolLM2-135M)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per text")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads per process")
    ap.add_argument("--peers_malloc", choices=("default", "keep"), default="default",
                    help="glibc malloc of the TRL and plain processes: glibc's defaults (what their users get) or "
                         "kd_engine's setting (isolates what the allocator is worth)")
    args = ap.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("error: TRL is not installed: pip install -e .[bench] (see requirements-bench.txt)")
    n_steps = args.warmup + args.steps + 1  # the last step only closes the last timed one
    if n_steps * args.batch > args.texts:
        raise SystemExit(f"error: {n_steps} steps of {args.batch} need more than --texts {args.texts}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kd_engine.models.loading import offline_model_path

    tmp = tempfile.mkdtemp(prefix="kd-peer-")
    teacher_dir = offline_model_path("smollm2-135m")
    student_dir = build_student(tmp, args.layers)
    write_corpus(os.path.join(tmp, "train.txt"), args.texts, args.seq)

    ctx = mp.get_context("spawn")
    turns = Turns(3, ctx)
    procs = [ctx.Process(target=_participant, args=(i, turns, tmp, teacher_dir, student_dir, n_steps, args))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if turns.failed.is_set() or any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"error: a participant failed (exit codes {[p.exitcode for p in procs]})")
    res = {n: json.load(open(os.path.join(tmp, f"{n}.json"))) for n in NAMES}
    kd = res["kd_engine"]
    assert kd["same_batches"], "kd_engine trained on other batches than the peers got"
    losses = {n: {int(k): v for k, v in r["losses"]} for n, r in res.items()}
    for n in NAMES[1:]:
        rel = abs(losses[n][1] - losses["kd_engine"][1]) / abs(losses["kd_engine"][1])
        assert rel < 1e-5, f"step-1 loss differs: kd_engine {losses['kd_engine'][1]:.8g}, {n} {losses[n][1]:.8g}"
    warm = args.warmup
    med = {n: statistics.median(r["times"][warm:]) for n, r in res.items()}
    result = {
        "kd_engine_vs_trl": round(med["trl_gkd"] / med["kd_engine"], 4),
        "kd_engine_vs_plain_fused": round(med["plain_fused"] / med["kd_engine"], 4),
        "median_step_s": {n: round(v, 4) for n, v in med.items()},
        "step_times_s": {n: [round(t, 4) for t in r["times"][warm:]] for n, r in res.items()},
        "losses": losses, "optimizers": {n: r["optimizer"] for n, r in res.items()},
        "versions": kd["versions"], "config": vars(args), "student_params": kd["student_params"],
    }
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    suffix = "" if args.peers_malloc == "default" else "_peers_malloc_keep"
    with open(os.path.join(out_dir, f"peer_step{suffix}.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    md = [f"# peer_step{suffix}", "",
          f"SmolLM2-135M teacher, {args.layers}-layer student ({kd['student_params']:,} params), batch "
          f"{args.batch} x {args.seq} tokens, fp32, {args.threads} threads per process, forward KL (T 1), AdamW {LR}, "
          f"clip {CLIP}; {args.steps} timed steps per loop after {args.warmup} warm-up, one process per loop, "
          f"interleaved step by step; peers' glibc malloc: {args.peers_malloc}.", "",
          "| loop | optimizer | median step (s) | step-1 loss |", "|---|---|---|---|"]
    for key, label in (("kd_engine", "kd_engine `--method kd --alpha 1 --temperature 1` (ZeRO-0)"),
                       ("trl_gkd", "TRL GKDTrainer (lmbda 0, beta 0, T 1)"),
                       ("plain_fused", "plain PyTorch loop")):
        md.append(f"| {label} | {result['optimizers'][key]} | {med[key]:.3f} | {losses[key][1]:.6f} |")
    md += ["", f"kd_engine_vs_trl = {result['kd_engine_vs_trl']} (target >= 1.10), kd_engine_vs_plain_fused = "
           f"{result['kd_engine_vs_plain_fused']} (target >= 0.95); versions {result['versions']}"]
    with open(os.path.join(out_dir, f"peer_step{suffix}.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"results in {out_dir}/peer_step{suffix}.{{json,md}}")
    print(json.dumps({"kd_engine_vs_trl": result["kd_engine_vs_trl"],
                      "kd_engine_vs_plain_fused": result["kd_engine_vs_plain_fused"]}))


if __name__ == "__main__":
    main()

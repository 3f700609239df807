"""A teacher split over 3 ranks (--teacher_tp 3) vs a replica on each rank, side by side in one run.

SmolLM2-135M (the offline package; 9 attention heads, 3 KV heads: 3 divides both, 2 does not), 3 ranks of gloo on
this 2-core CPU, one thread each. Each rank loads the teacher, runs its own batch (4 x 128 tokens of WikiText-2)
through it, and reports: the teacher's bytes held by the rank (parameters, counting a sharded tensor's local
part), the peak RSS growth of loading it and running 4 forwards, the forward time per micro-batch, and the largest
logit difference to the replica on the same batch.

    python benchmarks/tp_teacher.py            # JSON last line; benchmarks/results/tp_teacher.{json,md}

Ratios: ``param_bytes_ratio`` = TP bytes / replica bytes per rank (ideal 1/3 plus the replicated embeddings and
norms), ``rss_ratio`` (the same for the peak RSS growth, activations and logits included; ``anon_rss_ratio`` for
anonymous memory only), ``forward_time_ratio`` (TP runs the group's 3 batches on every rank: the replica's work,
split in thirds, three times, plus the all-reduces; 3 ranks share 2 cores here), ``max_logit_diff``.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, ROOT, PeakGrowth, status_kib  # noqa: E402

DATA = os.path.join(ROOT, "..", "shared", "data")


def _texts(n: int) -> list[str]:
    for name in ("wikitext-2-raw/wiki.valid.raw",):
        p = os.path.join(DATA, name)
        if os.path.isfile(p):
            lines = [line.strip() for line in open(p, encoding="utf-8") if len(line.strip()) > 200]
            return lines[:n]
    return [("The teacher is split across two ranks and each rank holds half of every projection. " * 8)] * n


def _rank(rank: int, world: int, port: int, mode: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    sys.path.insert(0, ROOT)
    import torch
    import torch.distributed as dist

    from kd_engine.models.loading import load_model, load_tokenizer
    from kd_engine.models.tensor_parallel import load_tp_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    path = "offline:smollm2-135m"
    tok = load_tokenizer(path)
    texts = _texts(4 * world)[4 * rank:4 * rank + 4]
    batch = tok(texts, max_length=128, truncation=True, padding="max_length", return_tensors="pt")
    times = []
    with PeakGrowth() as load:  # loading and forwards: a replica's mmapped weights count once touched
        model = load_tp_model(path, "causal_lm", world) if mode == "tp" else load_model(path, "causal_lm")
        model.eval()
        with torch.no_grad():
            for _ in range(4):
                dist.barrier()
                t0 = time.perf_counter()
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                times.append(time.perf_counter() - t0)
    anon = status_kib("RssAnon")  # without file pages (a replica's weights may stay mmapped from safetensors)
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())
    torch.save(logits[batch["attention_mask"].bool()], os.path.join(out, f"{mode}{rank}.pt"))
    with open(os.path.join(out, f"{mode}{rank}.json"), "w") as f:
        json.dump({"param_bytes": held, "rss_kib": load.growth_kib, "anon_kib": anon,
                   "forward_s": sorted(times)[len(times) // 2]}, f)
    dist.destroy_process_group()


def main() -> int:
    import tempfile

    import torch
    import torch.multiprocessing as mp

    sys.path.insert(0, ROOT)
    from kd_engine.dist import free_port

    world = 3
    out = tempfile.mkdtemp(prefix="tp_teacher_")
    from kd_engine.models.loading import resolve

    resolve("offline:smollm2-135m")  # converted once, before the ranks start
    for mode in ("replica", "tp"):
        mp.spawn(_rank, args=(world, free_port(), mode, out), nprocs=world, join=True)
    rows = {m: [json.load(open(os.path.join(out, f"{m}{r}.json"))) for r in range(world)] for m in ("replica", "tp")}
    diff = max(float((torch.load(os.path.join(out, f"tp{r}.pt")) - torch.load(os.path.join(out, f"replica{r}.pt")))
                     .abs().max()) for r in range(world))

    def mean(m, k):
        return sum(r[k] for r in rows[m]) / world

    res = {"model": "SmolLM2-135M", "ranks": world, "batch": "4 x 128 tokens per rank",
           "replica_param_mib": round(mean("replica", "param_bytes") / 2 ** 20, 1),
           "tp_param_mib": round(mean("tp", "param_bytes") / 2 ** 20, 1),
           "param_bytes_ratio": round(mean("tp", "param_bytes") / mean("replica", "param_bytes"), 3),
           "replica_rss_mib": round(mean("replica", "rss_kib") / 1024, 1),
           "tp_rss_mib": round(mean("tp", "rss_kib") / 1024, 1),
           "rss_ratio": round(mean("tp", "rss_kib") / mean("replica", "rss_kib"), 3),
           "anon_rss_ratio": round(mean("tp", "anon_kib") / mean("replica", "anon_kib"), 3),
           "replica_forward_s": round(mean("replica", "forward_s"), 3),
           "tp_forward_s": round(mean("tp", "forward_s"), 3),
           "forward_time_ratio": round(mean("tp", "forward_s") / mean("replica", "forward_s"), 3),
           "max_logit_diff": diff}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "tp_teacher.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(RESULTS, "tp_teacher.md"), "w") as f:
        f.write("| measure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in res.items()))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

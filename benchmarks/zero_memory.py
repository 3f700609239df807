"""Per-rank memory of the student's optimizer state, gradients and parameters at ZeRO 0/1/2/3 on 2 ranks.

    python benchmarks/zero_memory.py [--dtype fp32|bf16|both]    # starts `torchrun --nproc_per_node 2` itself
Same model (Llama, 4 layers, hidden 256, vocab 8000) and the project's ds_configs/zero{0,1,2,3}[_bf16].json. On
each rank, after one optimizer step (so Adam's moments exist) and the backward pass of the next step (so gradient
buffers are live), every tensor the DeepSpeed engine holds is found (the base optimizer's state, the ZeRO
optimizer's attributes, the model's .grad / ZeRO-3 partitions), de-duplicated by storage and summed by kind:
  optimizer state = Adam moments + fp32 master weights/partitions; gradients = .grad tensors and ZeRO's
  gradient partitions/buckets; parameters = the module's (ZeRO-3: this rank's partitions) and low-precision flats.
Gradients are also measured after every parameter's gradient arrives during that backward pass: the ratios use
the peak of (optimizer state + gradients) there (ZeRO-1 holds the full gradients until the end of backward).
Buckets (reduce/allgather/prefetch) are set to 2e5 elements so a fixed-size buffer does not hide the scaling of a
model this small. Last line JSON with zero1/2/3_vs_zero0 of (optimizer state + gradients) and, for ZeRO-3, of
(optimizer state + gradients + parameters); report in benchmarks/results/zero_memory.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 200_000


def _storages(obj, depth=0, seen=None):
    """Yield tensors reachable from obj through lists, tuples and dicts."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _storages(o, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for o in obj.values():
            yield from _storages(o, depth + 1)


def _kind(name: str) -> str:
    n = name.lower()
    if "grad" in n or "ipg" in n:
        return "gradients"
    if "fp32" in n or "master" in n or "single_partition" in n:
        return "optimizer_state"
    return "parameters"


def measure(engine) -> dict[str, int]:
    import torch

    seen: dict[int, str] = {}
    sizes: dict[int, int] = {}

    def add(t, kind):
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        s = t.untyped_storage()
        key = s.data_ptr()
        if key == 0 or key in seen:
            return
        seen[key], sizes[key] = kind, s.nbytes()

    for p in engine.module.parameters():  # parameters first: a view of them elsewhere is not double-counted
        add(getattr(p, "ds_tensor", None), "parameters")
        if getattr(p, "ds_tensor", None) is None:
            add(p.data, "parameters")
        add(p.grad, "gradients")
    opt = engine.optimizer
    base = getattr(opt, "optimizer", None) if not isinstance(opt, torch.optim.Optimizer) else opt
    for opt_obj in [o for o in (base, opt) if o is not None]:
        if isinstance(opt_obj, torch.optim.Optimizer):
            for st in opt_obj.state.values():
                for t in _storages(st):
                    if t.numel() > 1:  # not Adam's step counter
                        add(t, "optimizer_state")
            for g in opt_obj.param_groups:
                for p in g["params"]:
                    add(p, "optimizer_state")  # ZeRO: fp32 master partitions; ZeRO-0: the parameters (seen)
                    add(p.grad, "gradients")
    if opt is not base:
        for name, val in vars(opt).items():
            for t in _storages(val):
                add(t, _kind(name))
                add(t.grad, "gradients")
    out = {"optimizer_state": 0, "gradients": 0, "parameters": 0}
    for key, kind in seen.items():
        out[kind] += sizes[key]
    return out


def worker(dtype: str, result_path: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    results = {}
    for stage in (0, 1, 2, 3):
        name = f"zero{stage}" + ("_bf16" if dtype == "bf16" else "")
        ds = json.load(open(os.path.join(ROOT, "ds_configs", f"{name}.json")))
        ds.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, train_batch_size=2 * world,
                  gradient_clipping=1.0)
        ds["optimizer"]["params"] = {"lr": 1e-3, "torch_adam": True}
        zo = ds.setdefault("zero_optimization", {})
        zo.update(reduce_bucket_size=BUCKET, allgather_bucket_size=BUCKET)
        if stage == 3:
            zo.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=BUCKET,
                      stage3_max_live_parameters=BUCKET, stage3_max_reuse_distance=BUCKET)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        ids = torch.randint(0, 8000, (2, 32), generator=torch.Generator().manual_seed(rank))
        peak = {"gradients": 0, "opt_plus_grad": 0}

        def watch(*_):  # after each parameter's gradient arrives: the live total, so the backward peak is seen
            m = measure(engine)
            peak["gradients"] = max(peak["gradients"], m["gradients"])
            peak["opt_plus_grad"] = max(peak["opt_plus_grad"], m["gradients"] + m["optimizer_state"])

        for step in range(2):
            loss = engine(input_ids=ids, labels=ids).loss
            if step == 1:
                hooks = [p.register_post_accumulate_grad_hook(watch) for p in engine.module.parameters()]
            engine.backward(loss)
            if step == 0:
                engine.step()
        for h in hooks:
            h.remove()
        mem = measure(engine)
        watch()
        engine.step()
        results[name] = {"stage": stage, "params": n_params, **mem, "peak_gradients": peak["gradients"],
                         "peak_opt_plus_grad": peak["opt_plus_grad"]}
        del engine, model
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(result_path, "w") as fh:
            json.dump(gathered, fh)


def run(dtype: str) -> dict:
    import tempfile

    path = tempfile.mktemp(suffix=".json")
    env = dict(os.environ, DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    sys.path.insert(0, ROOT)
    from kd_engine.dist import free_port

    r = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                        str(free_port()), os.path.abspath(__file__), "--worker", dtype, "--result", path],
                       env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"error: the 2-rank measurement failed:\n{r.stderr[-3000:]}")
    per_rank = json.load(open(path))
    os.remove(path)
    return {name: {k: max(rk[name][k] for rk in per_rank) if isinstance(v, int) else v
                   for k, v in per_rank[0][name].items()} | {"per_rank": [rk[name] for rk in per_rank]}
            for name in per_rank[0]}


def ratios(res: dict, suffix: str) -> dict:
    def og(n):  # optimizer state + gradients at the backward peak
        return res[n + suffix]["peak_opt_plus_grad"]

    z3 = res["zero3" + suffix]
    z0 = res["zero0" + suffix]
    return {f"zero1_vs_zero0{suffix}": round(og("zero1") / og("zero0"), 3),
            f"zero2_vs_zero0{suffix}": round(og("zero2") / og("zero0"), 3),
            f"zero3_vs_zero0{suffix}": round(og("zero3") / og("zero0"), 3),
            f"zero3_vs_zero0_with_params{suffix}": round(
                (og("zero3") + z3["parameters"]) / (og("zero0") + z0["parameters"]), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both", help="training dtype(s) measured")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.result)
    report, summary = {}, {}
    for dtype in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
        res = run(dtype)
        report.update(res)
        summary.update(ratios(res, "" if dtype == "fp32" else "_bf16"))
    summary["command"] = f"python benchmarks/zero_memory.py --dtype {args.dtype}"
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "zero_memory.json"), "w") as fh:
        json.dump({"summary": summary, "per_config": report, "bucket_elements": BUCKET}, fh, indent=2)
    mib = 1 / 2**20
    lines = ["# Per-rank student memory at ZeRO 0-3, 2 ranks (max over ranks, MiB)", "",
             f"`{summary['command']}`; Llama 4 layers, hidden 256, {report[next(iter(report))]['params']:,} params; "
             f"buckets {BUCKET:,} elements.", "",
             "| config | optimizer state | gradients after backward | peak gradients in backward | "
             "peak opt + grad | parameters |", "|---|---|---|---|---|---|"]
    for name, r in report.items():
        lines.append(f"| {name} | {r['optimizer_state'] * mib:.2f} | {r['gradients'] * mib:.2f} | "
                     f"{r['peak_gradients'] * mib:.2f} | {r['peak_opt_plus_grad'] * mib:.2f} | "
                     f"{r['parameters'] * mib:.2f} |")
    lines += ["", "Ratios (peak optimizer state + gradients, vs ZeRO-0 in the same dtype): "
              + ", ".join(f"{k} {v}" for k, v in summary.items() if k != "command")]
    with open(os.path.join(out_dir, "zero_memory.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"report: {os.path.join(out_dir, 'zero_memory.md')}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

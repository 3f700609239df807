"""The plugin API carries methods with their own step structure and extra trainable engines (MATE-KD-like):
a toy method with a generator engine and alternating generator/student steps, checkpointed and resumed exactly."""
import json
from dataclasses import dataclass

import pytest
import torch

import tiny
from kd_engine.config import build_config
from kd_engine.data.supervised import build_supervised_data
from kd_engine.losses.kd import kl_div_rows, shift_for_causal_lm
from kd_engine.methods.base import Method, register
from kd_engine.models.build import load_or_build_student, load_teacher_model


@dataclass
class ToyOptions:
    generator_every: int = 2  # every 2nd step is a generator step


@register("toy_adversarial")
class ToyAdversarial(Method):
    """Perturbs input embeddings with a trainable generator that maximises the student/teacher divergence."""

    Options = ToyOptions

    def load_teacher(self, ctx):
        return load_teacher_model(self.cfg, "causal_lm")

    def load_student(self, ctx, teacher):
        return load_or_build_student(self.cfg, teacher, "causal_lm")

    def build_data(self, ctx):
        return build_supervised_data(self.cfg, ctx.tokenizer, "causal_lm")

    def setup(self, ctx):
        hidden = ctx.student.module.config.hidden_size
        torch.manual_seed(123)
        gen = torch.nn.Linear(hidden, hidden)
        self.generator = ctx.add_engine("generator", gen, {"optimizer": {"type": "AdamW", "params": {
            "lr": 1e-2, "torch_adam": True}}})
        self.steps_done = 0
        self.teacher_output_requires_grad: list[bool] = []

    def _divergence(self, ctx, batch, student, perturb_grad: bool):
        emb_s = student.get_input_embeddings()(batch["input_ids"])
        emb_t = ctx.teacher_module.get_input_embeddings()(batch["input_ids"])
        delta = 0.01 * torch.tanh(self.generator(emb_s.detach()))
        if not perturb_grad:
            delta = delta.detach()
        s = student(inputs_embeds=emb_s + delta, attention_mask=batch["attention_mask"]).logits
        # the generator's gradient also flows through the frozen teacher's activations (MATE-KD's generator step)
        t = ctx.teacher_forward(inputs_embeds=emb_t + delta, attention_mask=batch["attention_mask"],
                                grad=perturb_grad).logits
        self.teacher_output_requires_grad.append(t.requires_grad)
        s, lab = shift_for_causal_lm(s, batch["labels"])
        t, _ = shift_for_causal_lm(t, batch["labels"])
        return kl_div_rows(s, t, 1.0, lab != -100)

    def train_step(self, ctx):
        self.steps_done += 1
        if self.steps_done % self.opts.generator_every == 0:  # generator step through the frozen student
            with ctx.frozen(ctx.student) as student:
                terms = ctx.accumulate(lambda: {"generator_loss": -self._divergence(ctx, ctx.next_batch(), student,
                                                                                    perturb_grad=True)},
                                       engine=self.generator)
            ctx.log_scalars({"generator_step": float(ctx.global_step)}, "toy")
            return terms
        return ctx.accumulate(lambda: {"kd": self._divergence(ctx, ctx.next_batch(), ctx.student, perturb_grad=False)})

    def state_dict(self):
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state):
        self.steps_done = state["steps_done"]


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("cache")))


def _run(argv):
    from kd_engine.engine.trainer import Trainer

    tr = Trainer(build_config(argv))
    tr.fit()
    return tr


def test_extra_engine_trains_checkpoints_and_resumes(tmp_path):
    tiny.make_llama(str(tmp_path / "teacher"), layers=2)
    tiny.write_lines(str(tmp_path / "train.txt"), tiny.sentences(32))

    def argv(out, steps, *extra):
        return ["--method", "toy_adversarial", "--teacher", str(tmp_path / "teacher"), "--student.layers", "1",
                "--train_file", str(tmp_path / "train.txt"), "--output_dir", str(out), "--max_steps", str(steps),
                "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
                "--disable_tqdm", "true", "--logging_steps", "1", *extra]

    a = _run(argv(tmp_path / "a", 4))
    # teacher_forward(grad=True) keeps the graph (generator steps), grad=False does not; both are timed
    assert a.method.teacher_output_requires_grad == [False, True, False, True] and a.teacher_seconds > 0
    assert all(p.grad is None for p in a.teacher_model.parameters())
    toy_log = [json.loads(x) for x in open(tmp_path / "a" / "train_log.jsonl") if '"toy"' in x]
    assert [r["generator_step"] for r in toy_log] == [1.0, 3.0]
    gen_a = {k: v.clone() for k, v in a.engines["generator"].module.state_dict().items()}
    assert not torch.equal(gen_a["weight"], torch.nn.Linear(*gen_a["weight"].shape).weight)  # it trained
    ck = tmp_path / "a" / "checkpoints" / "step-00000004"
    assert (ck / "generator").is_dir() and (ck / "student").is_dir()
    _run(argv(tmp_path / "b", 2))
    b = _run(argv(tmp_path / "b", 4, "--resume"))
    assert b.method.steps_done == 4
    for k, v in b.engines["generator"].module.state_dict().items():
        assert torch.equal(v, gen_a[k]), k
    sa, sb = a.student.module.state_dict(), b.student.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # generator steps left no gradient on the student, student steps none on the generator's weights' history
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in b.student.module.parameters())


def test_context_offers_exactly_the_documented_members():
    from kd_engine.engine.context import Context

    public = {n for n in dir(Context) if not n.startswith("_")}
    assert public == {"cfg", "opts", "tokenizer", "device", "rank", "world_size", "is_main", "student",
                      "next_batch", "teacher_forward", "teacher_hooks", "teacher_module", "served_teacher", "accumulate",
                      "student_step", "add_engine", "frozen", "log_scalars", "global_step", "total_steps"}


def test_eval_on_start_is_an_engine_option_for_every_method():
    from kd_engine.methods import method_names

    required = {"gkd": ["--target_column", "answer"]}  # options a method itself requires
    for name in method_names():
        assert build_config(["--method", name, "--eval_on_start", *required.get(name, [])]).train.eval_on_start
    assert build_config(["--method", "sft", "--eval_before_training", "true"]).train.eval_on_start  # old name


def test_perplexity_comes_from_the_loss_the_method_names():
    import math

    from kd_engine.engine.trainer import perplexities

    got = perplexities({"nll": 2.0, "teacher_nll": 1.0, "lm_loss": 5.0}, "nll")
    assert got == {"perplexity": math.exp(2.0), "teacher_perplexity": math.exp(1.0)}
    assert perplexities({"lm_loss": 5.0}, None) == {}  # no LM loss named: no perplexity


def test_teacher_forward_with_grad_at_zero3(tmp_path):
    """teacher_forward(grad=True) beside a ZeRO-3 student and a ZeRO-3 partitioned teacher: the generator's gradient
    flows through the teacher's activations (its engine's forward wrapper refused that backward before)."""
    tiny.make_llama(str(tmp_path / "teacher"), layers=2)
    tiny.write_lines(str(tmp_path / "train.txt"), tiny.sentences(16))
    tiny.ds_config_file(tmp_path / "z3.json")
    a = _run(["--method", "toy_adversarial", "--teacher", str(tmp_path / "teacher"), "--student.layers", "1",
              "--train_file", str(tmp_path / "train.txt"), "--output_dir", str(tmp_path / "z3"), "--max_steps", "2",
              "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--disable_tqdm", "true",
              "--deepspeed", str(tmp_path / "z3.json"), "--export", "false"])
    assert a.method.teacher_output_requires_grad == [False, True]
    assert all(p.grad is None for p in a.teacher_model.parameters())

"""Chat data (--messages_column): SmolLM2-135M-Instruct's real chat template, assistant-only masks, prompts for the
on-policy methods, end-to-end runs and the bad-input refusals."""
import json
import os

import pytest

import tiny
from kd_engine.cli import main as cli_main
from kd_engine.data.chat import encode_conversation, encode_prompt_response, render_conversation
from kd_engine.errors import KDError


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def tok():
    return tiny.smollm2_tokenizer()


def _assistant_runs(conv, tok):
    """The decoded text of each run of consecutive assistant tokens."""
    runs, cur = [], []
    for t, a in zip(conv.ids, conv.assistant):
        if a:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


ONE = [{"role": "user", "content": "What is the capital of France?"},
       {"role": "assistant", "content": "Paris is the capital of France."}]
MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "2+2?\nShow it."},
         {"role": "assistant", "content": "4\n(2 + 2 = 4)"},
         {"role": "user", "content": "Thanks"},
         {"role": "assistant", "content": " You're welcome, ünïcode too 日本"}]


@pytest.mark.parametrize("messages", [ONE, MULTI], ids=["one turn", "three turns"])
def test_assistant_mask_is_exactly_the_assistant_content_and_end_of_turn(tok, messages):
    conv = render_conversation(tok, messages, "test")
    # the ids are the template's own tokenization of the conversation
    assert conv.ids == list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    want = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert _assistant_runs(conv, tok) == want
    # nothing of the user, system or template scaffolding is in the mask; the newline after <|im_end|> is not either
    n_eot = sum(1 for t, a in zip(conv.ids, conv.assistant) if a and t == tok.convert_tokens_to_ids("<|im_end|>"))
    assert n_eot == len(want) and len(conv.turn_starts) == len(want)
    ex = encode_conversation(tok, messages, 512, "test")
    assert [y for y in ex["labels"] if y != -100] == [t for t, a in zip(conv.ids, conv.assistant) if a]


def test_prompt_ends_at_the_generation_prompt_and_the_response_is_the_last_turn(tok):
    prompt, response = encode_prompt_response(tok, MULTI, "test", need_response=True)
    gen = tok.apply_chat_template(MULTI[:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(prompt) == gen and gen.endswith("<|im_start|>assistant\n")
    assert tok.decode(response) == MULTI[-1]["content"] + "<|im_end|>" and response[-1] == tok.eos_token_id
    # a conversation ending on the user: a prompt alone (gkd lmbda 1, minillm), refused where a response is needed
    p2, r2 = encode_prompt_response(tok, MULTI[:-1], "test", need_response=False)
    assert r2 is None and tok.decode(p2) == gen
    with pytest.raises(KDError, match="does not end with an assistant turn"):
        encode_prompt_response(tok, MULTI[:-1], "t", need_response=True)


def test_cut_at_max_length_keeps_the_start_and_drops_conversations_without_assistant_tokens(tok):
    full = encode_conversation(tok, MULTI, 512, "t")
    cut = encode_conversation(tok, MULTI, 40, "t")
    assert cut["input_ids"] == full["input_ids"][:40] and cut["labels"] == full["labels"][:40]
    assert encode_conversation(tok, MULTI, 8, "t") is None  # only system/user tokens fit


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    tiny.make_chat_llama(str(d / "teacher"), layers=2)
    tiny.write_chats(str(d / "chats.jsonl"), 12, seed=1, turns=2)
    tiny.write_chats(str(d / "chats_open.jsonl"), 8, seed=2, last_role="user")
    rows = [json.loads(x) for x in open(d / "chats.jsonl")]
    bad = {"no_assistant": [{"role": "user", "content": "hi"}],
           "not_list": "hello there",
           "bad_role": [{"role": "asistant", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    for name, value in bad.items():
        with open(d / f"{name}.jsonl", "w") as f:
            for i, r in enumerate(rows[:4]):
                f.write(json.dumps({"messages": value if i == 2 else r["messages"]}) + "\n")
    return d


def _args(d, out, method="kd", *extra, data="chats.jsonl"):
    gen = ["--max_new_tokens", "6", "--max_prompt_length", "96"] if method in ("gkd", "seqkd", "minillm") else []
    return ["--method", method, "--teacher", str(d / "teacher"), "--student.layers", "1", "--train_file",
            str(d / data), "--messages_column", "messages", "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--max_length", "128", "--disable_tqdm", "true",
            "--logging_steps", "1", *gen, *extra]


def _train_log(out):
    return [json.loads(x) for x in open(out / "train_log.jsonl") if json.loads(x)["split"] == "train"]


@pytest.mark.parametrize("method,extra", [("kd", ()), ("sft", ()), ("seqkd", ()), ("gkd", ("--lmbda", "0.5"))])
def test_methods_train_on_chat_rows(assets, tmp_path, capsys, method, extra):
    out = tmp_path / method
    assert cli_main(_args(assets, out, method, *extra)) == 0
    log = _train_log(out)
    assert len(log) == 2 and all(r["loss"] == r["loss"] for r in log)
    assert "done: 2 steps" in capsys.readouterr().out


def test_prompt_only_conversations_train_gkd_on_policy(assets, tmp_path):
    out = tmp_path / "gkd1"
    assert cli_main(_args(assets, out, "gkd", "--lmbda", "1", data="chats_open.jsonl")) == 0
    assert all(r["on_policy"] == 1.0 for r in _train_log(out))


def test_kd_chat_loss_is_on_assistant_tokens_only(assets, tmp_path):
    """The data the kd run trains on: labels only on assistant tokens, as the template renders them."""
    from kd_engine.config import build_config
    from kd_engine.data.supervised import build_supervised_data

    cfg = build_config(_args(assets, tmp_path / "x")).train
    tok = tiny.smollm2_tokenizer()
    data = build_supervised_data(cfg, tok, "causal_lm")
    row = data.train[0]
    said = tok.decode([y for y in row["labels"] if y != -100])
    msgs = json.loads(open(assets / "chats.jsonl").readline())["messages"]
    assert said == "".join(m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant")


BAD = [
    ("missing column", ["--messages_column", "conversation"], "no column 'conversation'"),
    ("non-list values", ["--train_file", "{d}/not_list.jsonl"], "row 3: the messages column holds str"),
    ("no assistant turn", ["--train_file", "{d}/no_assistant.jsonl"], "row 3: the conversation has no assistant"),
    ("unknown role", ["--train_file", "{d}/bad_role.jsonl"], "unknown role 'asistant'"),
    ("method without chat data", ["--method", "mate_kd"], "does not read chat data"),
    ("with target_column", ["--target_column", "answer"], "excludes --target_column"),
]


@pytest.mark.parametrize("name,extra,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_input_is_one_error_and_writes_nothing(assets, tmp_path, capsys, name, extra, needle):
    out = tmp_path / "run"
    rc = cli_main(_args(assets, out, "kd", *[e.replace("{d}", str(assets)) for e in extra]))
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not out.exists()


def test_tokenizer_without_a_chat_template_is_refused(assets, tmp_path, capsys):
    d = tmp_path / "plain"
    tiny.make_llama(str(d), layers=1)
    out = tmp_path / "run"
    argv = _args(assets, out, "sft")
    argv[argv.index("--teacher") + 1] = str(d)
    rc = cli_main(argv)
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "has none" in err[0] and not os.path.exists(out)

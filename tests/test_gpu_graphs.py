"""`cuda_graphs: true` on a GPU (`pytest -m gpu tests/test_gpu_graphs.py`): the decoder's pieces are captured once and
replayed, and a run with graphs follows the loss curve of the same run without them.

A Llama-shaped model with random weights, LoRA r16 on all 7 linears, bf16, packed rows padded to sequence_len, through
`ftkit.train.train` (its patch step, the Trainer's autocast, its collator). The CPU side of the same code (the pieces
equal the model) is tests/test_kernels_graphs.py."""
import pytest
import torch

from helpers import StubTok
from test_gpu import _cfg, _docs, _llama

pytestmark = pytest.mark.gpu


def _run(tmp_path, graphs: bool):
    from datasets import Dataset
    from ftkit.models import apply_adapter
    from ftkit.train import train
    cfg = _cfg(tmp_path / ("on" if graphs else "off"), adapter="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0,
               lora_target_linear=True, pad_to_sequence_len=True, max_steps=20, gradient_accumulation_steps=2,
               cuda_graphs=graphs)          # accumulation: the static-gradient-buffer hazard is exercised
    m = apply_adapter(cfg, _llama(hidden=512, layers=4, heads=8, kv=2), quiet=True)
    r = train(cfg, data=(Dataset.from_list(_docs(400)), None), model=m, tokenizer=StubTok(), quiet=True)
    return r, m


def test_graphed_run_matches_the_eager_run(tmp_path):
    off, _ = _run(tmp_path, False)
    on, m = _run(tmp_path, True)
    clm = m.get_base_model() if hasattr(m, "get_base_model") else m
    g = getattr(clm, "_ftkit_graphs", None)
    assert g is not None, "cuda_graphs was not applied"
    assert g.failed is None and g.whole_failed is None, (g.failed, g.whole_failed)
    assert g.mode == "decoder", g.mode            # the whole decoder, attention included, is one graph
    assert 1 <= g.captures <= 8, g.captures       # one row shape; a graph per longest-segment class, again for more documents
    assert not g.graphed
    a = [off.losses[s] for s in sorted(off.losses)]
    b = [on.losses[s] for s in sorted(on.losses)]
    assert len(a) == len(b) == 20
    worst = max(abs(x - y) / abs(y) for x, y in zip(b, a))
    print(f"cuda_graphs loss curve: off {a[0]:.4f} -> {a[-1]:.4f}, on {b[0]:.4f} -> {b[-1]:.4f}, worst step {worst:.3%}")
    assert b[-1] < 0.8 * b[0] and worst < 0.02

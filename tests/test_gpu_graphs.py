"""`cuda_graphs: true` on a GPU (`pytest -m gpu tests/test_gpu_graphs.py`): the whole decoder is captured and replayed,
and a run with graphs follows the loss curve of the same run without them, with either attention inside the graph
(ftkit's Triton varlen attention, the "auto" choice: one capture for every row; or flash varlen, one capture per
longest-segment class); and one Triton capture gives the eager model's loss and gradients on rows of any segmentation.

A Llama-shaped model with random weights, LoRA r16 on all 7 linears, bf16, packed rows padded to sequence_len, through
`ftkit.train.train` (its patch step, the Trainer's autocast, its collator). The CPU side of the same code (the pieces
and the decoder equal the model) is tests/test_kernels_graphs.py."""
from types import SimpleNamespace as NS

import pytest
import torch

from helpers import StubTok
from test_gpu import _cfg, _docs, _llama

pytestmark = pytest.mark.gpu
ATTN7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _run(tmp_path, graphs: bool, attention: str | None = None):
    from datasets import Dataset
    from ftkit.models import apply_adapter
    from ftkit.train import train
    cfg = _cfg(tmp_path / ("on" if graphs else "off"), adapter="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0,
               lora_target_linear=True, pad_to_sequence_len=True, max_steps=20, gradient_accumulation_steps=2,
               cuda_graphs=graphs, **({"cuda_graph_attention": attention} if attention else {}))
    # accumulation: the static-gradient-buffer hazard is exercised
    m = apply_adapter(cfg, _llama(hidden=512, layers=4, heads=8, kv=2), quiet=True)
    r = train(cfg, data=(Dataset.from_list(_docs(400)), None), model=m, tokenizer=StubTok(), quiet=True)
    return r, m


@pytest.mark.parametrize("attention", ["auto", "flash"])
def test_graphed_run_matches_the_eager_run(tmp_path, attention):
    off, _ = _run(tmp_path, False)
    on, m = _run(tmp_path, True, attention)
    clm = m.get_base_model() if hasattr(m, "get_base_model") else m
    g = getattr(clm, "_ftkit_graphs", None)
    assert g is not None, "cuda_graphs was not applied"
    assert g.failed is None and g.whole_failed is None, (g.failed, g.whole_failed)
    assert g.mode == "decoder", g.mode            # the whole decoder, attention included, is one graph
    assert not g.graphed
    if attention == "auto":                       # head dim 64, bf16: the Triton attention serves
        assert g.attention == "triton varlen" and g.attention_fallback is None, g.as_dict()
        assert g.captures == 1, g.captures        # one row shape, rows within the plan's documents: one capture
    else:
        assert g.attention == "flash varlen (padded)", g.as_dict()
        assert 1 <= g.captures <= 8, g.captures   # a graph per longest-segment class, again for more documents
    a = [off.losses[s] for s in sorted(off.losses)]
    b = [on.losses[s] for s in sorted(on.losses)]
    assert len(a) == len(b) == 20
    worst = max(abs(x - y) / abs(y) for x, y in zip(b, a))
    print(f"cuda_graphs ({g.attention}) loss curve: off {a[0]:.4f} -> {a[-1]:.4f}, on {b[0]:.4f} -> {b[-1]:.4f}, "
          f"worst step {worst:.3%}, captures {g.captures}")
    assert b[-1] < 0.8 * b[0] and worst < 0.02


# -------------------------------------------------------------------------------- one capture, many segmentations
ROWS = [                       # documents of two 1024-token rows, flattened (cu_seq_lens over 2048 tokens)
    [1024, 1024],
    [300, 500, 224, 100, 900, 24],
    [400, 400, 224, 512, 512],                   # longest 512: flash would need a second class here
    [1, 1023, 7, 17, 1000],
]
MORE = [100] * 10 + [24, 1024]                   # 12 documents: more than the capture's 8, captured again


def _lora(m):
    from peft import LoraConfig, get_peft_model
    p = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=ATTN7, lora_dropout=0.0))
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for n, t in p.named_parameters():
            if "lora_B" in n:                    # nonzero B: the A matrices get gradients too
                t.copy_(0.05 * torch.randn(t.shape, generator=g, device="cuda"))
    return p.train()


def _step(m, ids, lens):
    "One collator-shaped call (loss and backward); the loss and the adapters' gradients."
    pos = torch.cat([torch.arange(n) for n in lens]).view(ids.shape).cuda()
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    ps = [p for p in m.parameters() if p.requires_grad]
    for p in ps:
        p.grad = None
    out = m(input_ids=ids, position_ids=pos, labels=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens),
            max_length_k=max(lens))
    out.loss.backward()
    return out.loss.item(), [p.grad.detach().clone() for p in ps]


def _close(got, ref, tol):
    (lg, gg), (lr, gr) = got, ref
    assert abs(lg - lr) <= tol * abs(lr), (lg, lr)
    for a, b in zip(gg, gr):
        err = ((a - b).norm() / (b.norm() + 1e-12)).item()
        assert err <= tol, err


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 5e-2)])
def test_one_triton_capture_serves_every_segmentation(dtype, tol):
    """The captured decoder with the Triton attention gives the eager model's loss and gradients (relative L2) on rows
    of different segmentations, all from one capture; a row with more documents than captured captures once more.
    fp32: exact attention both ways (the eager model's masked SDPA, the kernel's IEEE dots); bf16: against torch's
    varlen flash, as training runs."""
    from ftkit.kernels.patch import apply_kernels
    from ftkit.packing import register_varlen_attention
    register_varlen_attention()
    m = _lora(_llama(vocab=512, hidden=256, layers=2, heads=4, kv=2, dtype=dtype))
    ids = torch.randint(4, 500, (2, 1024), generator=torch.Generator().manual_seed(0)).cuda()
    apply_kernels(m, None)
    refs = [_step(m, ids, lens) for lens in ROWS + [MORE]]
    rep = apply_kernels(m, NS(cuda_graphs=True))
    g = rep.graphs
    assert g is not None and g.capture and g.attention == "triton varlen", str(rep)
    for lens, ref in zip(ROWS * 2, refs[:len(ROWS)] * 2):      # twice: replays, not captures
        _close(_step(m, ids, lens), ref, tol)
        assert g.mode == "decoder" and g.captures == 1, (g.mode, g.as_dict())
    _close(_step(m, ids, MORE), refs[-1], tol)
    assert g.captures == 2 and g.whole_failed is None and g.attention_fallback is None, g.as_dict()
    _close(_step(m, ids, ROWS[1]), refs[1], tol)              # the larger capture serves the fewer documents too
    assert g.captures == 2

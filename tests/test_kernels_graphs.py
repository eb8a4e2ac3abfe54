"""`cuda_graphs: true` (ftkit.kernels.graphs): the decoder cut at attention into pieces that CUDA graphs capture.

On the CPU (TRITON_INTERPRET=1) nothing is captured, but the same pieces run eagerly, so these tests check what
capture cannot change: that the pieces compute the patched model's loss and adapter gradients on packed rows, that
the key is off unless set, that every condition graphs need is checked with a reason, and that undo removes them;
and for the attention inside the whole-decoder graph, that the Triton varlen attention (`attention="triton"`, the
"auto" choice where it serves) equals the model's, that "auto" falls back to flash with the reason where it cannot
serve or when it fails. Capture itself (and the loss curve of a run with graphs against one without) is `tests/test_gpu_graphs.py`."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from types import SimpleNamespace as NS  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")
from ftkit.kernels.graphs import PiecewiseGraphs  # noqa: E402
from ftkit.kernels.patch import apply_kernels  # noqa: E402
from ftkit.packing import register_varlen_attention  # noqa: E402
from test_kernels_patch import ATTN7, IDS, LAB, POS, assert_same, lora, loss_and_grads, tiny  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU-interpreter tests")
register_varlen_attention()


def varlen(mt, **kw):
    m = tiny(mt, **kw)
    m.config._attn_implementation = "ftkit_varlen"          # ftkit's packed attention: no mask, segments from positions
    return m


CU = torch.tensor([0, 8, 21], dtype=torch.int32)        # the collator's offsets of POS's two documents


def loss_and_grads_cu(model):
    "As the collator calls it: with cu_seq_lens and the longest segment, which send the call to the whole decoder."
    out = model(input_ids=IDS, position_ids=POS, labels=LAB, cu_seq_lens_q=CU, cu_seq_lens_k=CU, max_length_q=13,
                max_length_k=13)
    ps = [p for p in model.parameters() if p.requires_grad]
    return out.loss.detach(), torch.autograd.grad(out.loss, ps)


@pytest.mark.parametrize("mt", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("mode", ["pieces", "decoder"])
def test_pieces_equal_the_patched_model(mt, mode):
    "Both graphed paths, run eagerly: the pieces between attention calls, and the whole decoder on padded cu_seq_lens."
    m = lora(varlen(mt), ATTN7)
    apply_kernels(m, None, interpret=True)
    ref = loss_and_grads(m)
    rep = apply_kernels(m, NS(cuda_graphs=True), interpret=True)
    assert ("cuda_graphs", "model") in rep.patched, str(rep)
    g = m.get_base_model()._ftkit_graphs
    assert isinstance(g, PiecewiseGraphs) and not g.capture and len(g.pieces) == m.config.num_hidden_layers + 1
    inner = m.get_base_model().model
    inner.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the decoder's own forward ran"))
    try:
        assert_same((loss_and_grads_cu if mode == "decoder" else loss_and_grads)(m), ref, tol=1e-6)
    finally:
        del inner.forward
    assert g.mode == mode
    rep.undo()
    assert not hasattr(m.get_base_model(), "_ftkit_graphs")


def test_off_unless_the_key_is_true():
    m = lora(varlen("llama"), ATTN7)
    for cfg in (None, NS(cuda_graphs=None), NS(cuda_graphs=False)):
        rep = apply_kernels(m, cfg, interpret=True)
        assert not any(k == "cuda_graphs" for k, _ in rep.patched) and not hasattr(m.get_base_model(), "_ftkit_graphs")
    assert "cuda_graphs" not in str(apply_kernels(m, None, interpret=True))


@pytest.mark.parametrize("case, reason", [
    ("dropout", "lora_dropout > 0"),
    ("sliding", "sliding-window"),
    ("sdpa", "attn_implementation"),
    ("checkpointing", "gradient_checkpointing"),
    ("offloading", "offloading"),
    ("relora", "relora"),
    ("no_mlp_kernel", "not a fused LoRA kernel"),
    ("launched", "several processes"),
])
def test_each_condition_is_checked_with_a_reason(case, reason, monkeypatch):
    if case == "launched":                                   # a launched worker, before its process group exists
        monkeypatch.setenv("WORLD_SIZE", "2")
    mt = "mistral" if case == "sliding" else "llama"
    base = tiny(mt) if case == "sdpa" else varlen(mt)
    if case == "checkpointing":
        base.gradient_checkpointing_enable()                 # read from the model: the pieces would skip its checkpoints
    m = lora(base, ATTN7, dropout=0.1 if case == "dropout" else 0.0)
    cfg = NS(cuda_graphs=True, relora=case == "relora", lora_mlp_kernel=False if case == "no_mlp_kernel" else None,
             activation_offloading=case == "offloading")
    rep = apply_kernels(m, cfg, interpret=True)
    skipped = [r for k, _, r in rep.skipped if k == "cuda_graphs"]
    assert skipped and reason in skipped[0], (skipped, str(rep))
    assert not hasattr(m.get_base_model(), "_ftkit_graphs")


def test_calls_the_pieces_cannot_take_use_the_model(monkeypatch):
    "A padded batch (attention_mask), eval mode and no labels go through the decoder's own forward."
    m = lora(varlen("llama"), ATTN7)
    rep = apply_kernels(m, NS(cuda_graphs=True), interpret=True)
    g = m.get_base_model()._ftkit_graphs
    assert rep.graphs is g
    calls = []
    orig = PiecewiseGraphs.__call__
    monkeypatch.setattr(PiecewiseGraphs, "__call__", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    m(input_ids=IDS, position_ids=POS, labels=LAB)
    assert calls == [1]
    m(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=LAB)
    m.eval()
    m(input_ids=IDS, position_ids=POS, labels=LAB)
    m.train()
    m(input_ids=IDS, position_ids=POS)
    assert calls == [1], calls
    assert g.captures == 0 and g.failed is None


def test_a_cpu_model_says_why_without_the_interpreter_opt_in():
    "Outside the tests' interpreter opt-in, a CPU model gets no kernels; cuda_graphs: true is listed with the reason."
    m = lora(varlen("llama"), ATTN7)
    rep = apply_kernels(m, NS(cuda_graphs=True))
    assert not rep.patched and any(k == "cuda_graphs" and "CUDA" in r for k, _, r in rep.skipped), str(rep)


@pytest.mark.parametrize("key", [True, None, False])
def test_training_through_peft_runs_the_pieces(monkeypatch, tmp_path, key):
    """`train()` with an adapter from `apply_adapter`: PEFT's CausalLM forward passes its unset arguments on as None
    (inputs_embeds, output_attentions, ...); the training calls must still reach the pieces (the H200 run found them
    all going to the decoder's own forward, nothing captured). No warning that nothing could be graphed. Unset, the key
    is on for this config (packed LoRA rows, padded to sequence_len by default, no dropout); `cuda_graphs: false` is off."""
    import warnings

    from datasets import Dataset
    from helpers import StubTok, tiny_llama
    from test_gpu import _cfg, _docs

    import ftkit.kernels.patch as patch
    from ftkit.models import apply_adapter
    from ftkit.train import train
    monkeypatch.setattr(patch, "apply_kernels", lambda m, cfg=None, **kw: apply_kernels(m, cfg, interpret=True, **kw))
    cfg = _cfg(tmp_path, adapter="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True,
               sequence_len=64, micro_batch_size=1, max_steps=2, bf16=False, cuda_graphs=key)
    m = tiny_llama(vocab_size=128, attn="ftkit_varlen")
    m.ftkit_added_tokens = 0
    m = apply_adapter(cfg, m, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(cfg, data=(Dataset.from_list(_docs(16, hi=60)), None), model=m, tokenizer=StubTok(), quiet=True)
    g = m.get_base_model().__dict__.get("_ftkit_graphs")
    if key is False:
        assert g is None and "cuda_graphs" not in m.ftkit_kernels.counts()
        return
    assert m.ftkit_kernels.counts().get("cuda_graphs") == 1
    assert g.calls == 2 and g.captures == 0 and g.failed is None, (g.calls, g.captures, g.failed)
    assert g.mode == "decoder"                     # the collator's cu_seq_lens send packed rows to the whole decoder


def test_a_graphed_run_that_graphed_nothing_warns_when_released_not_when_undone():
    "The end of training (release_graphs) says when no call reached the graphs; undoing the patch before any step does not."
    import warnings
    m = lora(varlen("llama"), ATTN7)
    rep = apply_kernels(m, NS(cuda_graphs=True), interpret=True)
    rep.graphs.capture = True                      # as on a CUDA model: capture was possible, and no call came
    with pytest.warns(UserWarning, match="nothing was captured"):
        rep.release_graphs()
    rep.graphs.calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep.undo()
    assert rep.graphs is None and not hasattr(m.get_base_model(), "_ftkit_graphs")


def test_segment_buckets_and_padded_offsets():
    "The captured sizes: powers of two with a floor; padding repeats the last offset (empty segments), on the device."
    from ftkit.kernels.graphs import bucket, pad_cu
    assert [bucket(n, 8) for n in (1, 7, 8, 9, 17)] == [8, 8, 8, 16, 24]
    assert [bucket(n, 128) for n in (13, 129, 4096)] == [128, 256, 4096]
    assert pad_cu(CU, 5).tolist() == [0, 8, 21, 21, 21, 21]
    assert pad_cu(CU, 2) is CU
    g = PiecewiseGraphs(tiny("llama").model, capture=False)
    assert g._sizes(3, 100, T=4096) == (8, 512)                      # nothing expected: the row's own count, rounded
    g.expect(21)                                                     # the packing plan's most documents per row
    assert g._sizes(3, 100, T=4096) == (24, 512)                     # longest segment: its class
    assert g._sizes(3, 513, T=4096) == (24, 1024) and g._sizes(3, 1900, T=4096) == (24, 2048)
    assert g._sizes(3, 1900, T=1536) == (24, 1536)                   # never longer than the row
    assert g._sizes(25, 100, T=4096, have=NS(segments=24)) == (32, 512)   # more documents than captured: a quarter more


def test_gradient_buffers_stay_the_grads():
    """What the captured backward adds into: each trainable parameter's `.grad` is its buffer; a grad set to None by
    zero_grad() comes back zeroed, one another piece of code replaced is copied in, accumulated ones are left alone."""
    from ftkit.kernels.graphs import GradBuffers
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    gb = GradBuffers([a, b])
    gb.bufs[0].fill_(5.0)                              # left over from an earlier step's replays
    gb.attach()
    assert a.grad is gb.bufs[0] and b.grad is gb.bufs[1] and a.grad.tolist() == [0.0] * 3
    gb.bufs[0].add_(2.0)                               # what a backward replay does
    gb.attach()                                        # the next micro-batch: keeps accumulating
    assert a.grad.tolist() == [2.0] * 3
    b.grad = torch.full((2,), 7.0)                     # replaced elsewhere (e.g. an eager micro-batch)
    gb.attach()
    assert b.grad is gb.bufs[1] and b.grad.tolist() == [7.0, 7.0]
    a.grad = None                                      # optimizer.zero_grad(set_to_none=True)
    gb.attach()
    assert a.grad is gb.bufs[0] and a.grad.tolist() == [0.0] * 3


# ------------------------------------------------------------------------------- attention inside the decoder graph
D16 = {"hidden_size": 64, "head_dim": 16}           # a head dim the Triton varlen attention takes (tiny()'s is 8)
IDS2 = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(2))
POS2 = torch.tensor([list(range(8)) + list(range(13)), list(range(5)) + list(range(9)) + list(range(7))])
CU2 = torch.tensor([0, 8, 21, 26, 35, 42], dtype=torch.int32)     # the collator's offsets over the flattened rows


def run_cu(model, ids, pos, cu, longest):
    "Loss and adapter gradients of a collator-shaped call (cu_seq_lens over the flattened rows)."
    lab = ids.clone()
    lab[:, :3] = -100
    out = model(input_ids=ids, position_ids=pos, labels=lab, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                max_length_k=longest)
    ps = [p for p in model.parameters() if p.requires_grad]
    return out.loss.detach(), torch.autograd.grad(out.loss, ps)


def run_pos(model, ids, pos):
    "The same call as the model's own forward sees it without the graphs: segments from the position ids."
    lab = ids.clone()
    lab[:, :3] = -100
    out = model(input_ids=ids, position_ids=pos, labels=lab)
    ps = [p for p in model.parameters() if p.requires_grad]
    return out.loss.detach(), torch.autograd.grad(out.loss, ps)


def counting(monkeypatch):
    "Count the Triton attention's calls (the decoder reads `graphs.triton_attention` when it is built)."
    import ftkit.kernels.graphs as graphs
    calls, orig = [], graphs.triton_attention
    monkeypatch.setattr(graphs, "triton_attention", lambda *a: calls.append(1) or orig(*a))
    return calls


def graphed(m, attention: str) -> PiecewiseGraphs:
    "The model's graphs, rebuilt eagerly with `attention` (apply_kernels builds them with the default, 'auto')."
    rep = apply_kernels(m, NS(cuda_graphs=True), interpret=True)
    assert ("cuda_graphs", "model") in rep.patched, str(rep)
    clm = m.get_base_model()
    clm._ftkit_graphs = rep.graphs = PiecewiseGraphs(clm.model, capture=False, attention=attention)
    return rep.graphs


@pytest.mark.parametrize("mt, rows", [("llama", 1), ("llama", 2), ("qwen2", 1), ("qwen3", 1)])
def test_triton_decoder_equals_the_patched_model(mt, rows, monkeypatch):
    """attention="triton", run eagerly: the whole decoder with ftkit's Triton varlen attention (one or two packed rows,
    flattened) gives the patched model's loss and adapter gradients; every layer's attention went through it."""
    m = lora(varlen(mt, **D16), ATTN7)
    apply_kernels(m, None, interpret=True)
    ids, pos, cu, longest = (IDS, POS, CU, 13) if rows == 1 else (IDS2, POS2, CU2, 13)
    ref = run_pos(m, ids, pos)
    g = graphed(m, "triton")
    calls = counting(monkeypatch)
    assert_same(run_cu(m, ids, pos, cu, longest), ref, tol=1e-5)
    assert g.mode == "decoder" and g.attention == "triton varlen" and g.attention_fallback is None
    assert len(calls) == m.config.num_hidden_layers


def test_auto_picks_triton_where_it_serves():
    "apply_kernels' graphs (attention 'auto') on a head dim of 16: Triton, in the report; 'flash' keeps the classes."
    m = lora(varlen("llama", **D16), ATTN7)
    rep = apply_kernels(m, NS(cuda_graphs=True), interpret=True)
    g = rep.graphs
    assert g.attention_mode == "auto" and g.triton and g.attention_fallback is None
    assert g.as_dict()["attention"] == "triton varlen"
    g.expect(21)
    assert g._sizes(3, 100, T=4096) == (24, 4096) and g._sizes(3, 1900, T=4096) == (24, 4096)   # one class: the row
    f = PiecewiseGraphs(g.inner, capture=False, attention="flash")
    assert not f.triton and f.attention == "flash varlen (padded)" and f.attention_fallback is None
    f.expect(21)
    assert f._sizes(3, 1900, T=4096) == (24, 2048)


@pytest.mark.parametrize("case, reason", [
    ("head_dim_48", "head dim 48 is not a power of two"),
    ("head_dim_8", "head dim 8"),
    ("sliding", "sliding-window"),
    ("softcap", "soft-capped"),
    ("no_interpreter", "Triton cannot run on cpu"),
])
def test_auto_falls_back_to_flash_with_the_reason(case, reason, monkeypatch):
    "Where the Triton kernel cannot serve: 'auto' runs flash and says why, 'triton' refuses."
    kw = {"head_dim_48": {"head_dim": 48}, "head_dim_8": {}}.get(case, D16)
    m = lora((tiny if case == "sliding" else varlen)("mistral" if case == "sliding" else "llama", **kw), ATTN7)
    if case == "softcap":
        m.config.attn_logit_softcapping = 20.0
    apply_kernels(m, None, interpret=True)         # graphs themselves refuse a sliding window: build them directly
    inner = m.get_base_model().model
    if case == "no_interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = PiecewiseGraphs(inner, capture=False)
    assert not g.triton and g.attention == "flash varlen (padded)"
    assert reason in g.attention_fallback and g.as_dict()["attention_fallback"] == g.attention_fallback
    with pytest.raises(ValueError, match=reason):
        PiecewiseGraphs(inner, capture=False, attention="triton")


def test_unknown_attention_is_an_error():
    with pytest.raises(ValueError, match="attention must be one of"):
        PiecewiseGraphs(tiny("llama").model, capture=False, attention="sdpa")


@pytest.mark.parametrize("attention", ["auto", "triton"])
def test_a_failing_triton_attention(attention, monkeypatch):
    """The Triton attention raising (as a failed compile or capture would): 'auto' warns once, records why and runs
    flash from then on, with the model's results; 'triton' raises."""
    import warnings

    import ftkit.kernels.graphs as graphs
    m = lora(varlen("llama", **D16), ATTN7)
    apply_kernels(m, None, interpret=True)
    ref = run_pos(m, IDS, POS)
    g = graphed(m, attention)

    def boom(*a):
        raise RuntimeError("no kernel today")
    monkeypatch.setattr(graphs, "triton_attention", boom)
    if attention == "triton":
        with pytest.raises(RuntimeError, match="attention='triton'.*no kernel today"):
            run_cu(m, IDS, POS, CU, 13)
        return
    with pytest.warns(UserWarning, match="no kernel today"):
        got = run_cu(m, IDS, POS, CU, 13)
    assert_same(got, ref, tol=1e-6)
    assert not g.triton and g.attention == "flash varlen (padded)" and "no kernel today" in g.attention_fallback
    with warnings.catch_warnings(record=True) as seen:             # flash from now on: no second warning
        warnings.simplefilter("always")
        assert_same(run_cu(m, IDS, POS, CU, 13), ref, tol=1e-6)
    assert not [w for w in seen if "cuda_graphs" in str(w.message)]

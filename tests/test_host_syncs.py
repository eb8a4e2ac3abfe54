"""No host syncs inside the training step: one real packed LoRA step (forward, loss, backward) through ftkit's trainer
calls nothing that reads a tensor's value on the host from ftkit's own code (ftkit/*, ftkit.kernels).

How it counts. On the CPU a device->host read is not a real sync, so the test counts the *calls* that would sync on a
GPU: the Tensor methods ``item``, ``tolist``, ``__bool__`` (``if t:``, Python comparisons used as conditions),
``__int__``, ``__float__``, ``__index__``, ``cpu``, ``numpy``, ``nonzero``, ``masked_select``, ``unique``,
``repeat_interleave`` with a tensor of repeats and no ``output_size``, indexing / assignment with a boolean mask
(data-dependent shapes), and ``torch.nonzero`` / ``torch.equal`` / ``torch.allclose`` / ``torch.is_nonzero``. They are
wrapped with counting wrappers by ``monkeypatch`` inside the test only (restored afterwards). Each call is attributed to
the innermost calling frame outside the ``torch`` package; calls with a frame of the ``triton`` package anywhere on
the stack are left out: under ``TRITON_INTERPRET=1`` Triton's interpreter copies kernel arguments to and from host
arrays itself, which a real GPU launch does not do.

The step is built the way training builds it: ``build_trainer`` on a tiny random-weight Llama with LoRA and
``sample_packing``, the batch from the trainer's own dataloader (ftkit's ``PackedCollator`` wrapped in ``_Counted``:
``position_ids``, ``cu_seq_lens_q/k``, host-int ``max_length_q/k``; with prompt-heavy rows also ``ftkit_keep`` /
``ftkit_shift_labels``), ``num_items_in_batch`` from the Trainer, then ``trainer.training_step`` (forward, loss,
``accelerator.backward``). It runs with ftkit's kernels on (``apply_kernels(..., interpret=True)``) and off
(transformers' Llama path with ftkit's varlen attention).

Known sync outside ftkit, not asserted on: transformers' ``masking_utils.find_packed_sequence_indices`` (called by
``create_causal_mask`` once per model forward when ``position_ids`` are given without an attention mask) evaluates
``(packed_sequence_mask[:, -1] == 0).all()`` as a Python bool. Syncs outside forward/backward (the Trainer's
``.item()`` of the logged loss and gradient norm) are outside the measured call.
"""
import os
import sys
from collections import Counter
from pathlib import Path

import torch

if not torch.cuda.is_available():                  # CPU machines (CI): Triton's interpreter, before the kernels exist
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU-interpreter test; it counts host reads that a GPU run would sync on")

OURS = (str(Path(__file__).resolve().parents[1] / "ftkit") + os.sep,
        str(Path(__file__).resolve().parents[1] / "kernels") + os.sep)
_TORCH = os.sep + "torch" + os.sep
_TRITON = os.sep + "triton" + os.sep
_THIS = str(Path(__file__).resolve())


def _ours(filename: str) -> bool:
    import ftkit
    import ftkit.kernels
    roots = OURS + (str(Path(ftkit.__file__).parent) + os.sep, str(Path(ftkit.kernels.__file__).parent) + os.sep)
    return filename.startswith(roots)


class SyncCounter:
    "Counts sync-causing calls per (what, file:line of the innermost caller outside torch); see the module docstring."
    TENSOR = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
              "masked_select", "unique"]
    TORCH = ["nonzero", "equal", "allclose", "is_nonzero", "masked_select", "unique"]

    def __init__(self):
        self.hits = Counter()

    def record(self, what: str):
        f = sys._getframe(2)
        stack = []
        while f is not None:
            stack.append(f.f_code.co_filename)
            f = f.f_back
        if any(_TRITON in s for s in stack):
            return
        owner = next((i for i, s in enumerate(stack) if _TORCH not in s and s != _THIS), None)
        where = "?" if owner is None else stack[owner]
        line = 0
        if owner is not None:
            f = sys._getframe(2)
            for _ in range(owner):
                f = f.f_back
            line = f.f_lineno
        self.hits[(what, where, line)] += 1

    def install(self, mp):
        def wrap(name, fn):
            def w(*a, **k):
                self.record(name)
                return fn(*a, **k)
            return w

        for n in self.TENSOR:
            mp.setattr(torch.Tensor, n, wrap(f"Tensor.{n}", getattr(torch.Tensor, n)))
        for n in self.TORCH:
            mp.setattr(torch, n, wrap(f"torch.{n}", getattr(torch, n)))

        def is_mask(i):
            if isinstance(i, tuple):
                return any(is_mask(x) for x in i)
            return torch.is_tensor(i) and i.dtype == torch.bool

        get, put, rep = torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.repeat_interleave

        def getitem(t, i):
            if is_mask(i):
                self.record("boolean-mask indexing")
            return get(t, i)

        def setitem(t, i, v):
            if is_mask(i):
                self.record("boolean-mask assignment")
            return put(t, i, v)

        def repeat_interleave(t, repeats, *a, **k):
            if torch.is_tensor(repeats) and repeats.numel() > 1 and k.get("output_size") is None:
                self.record("repeat_interleave without output_size")
            return rep(t, repeats, *a, **k)
        mp.setattr(torch.Tensor, "__getitem__", getitem)
        mp.setattr(torch.Tensor, "__setitem__", setitem)
        mp.setattr(torch.Tensor, "repeat_interleave", repeat_interleave)
        return self

    def ours(self) -> dict:
        return {k: v for k, v in self.hits.items() if _ours(k[1])}

    def others(self) -> dict:
        return {k: v for k, v in self.hits.items() if not _ours(k[1])}


def _trainer(tmp_path, kernels: bool, prompt_heavy: bool):
    sys.path.insert(0, str(Path(__file__).parent))
    from datasets import Dataset
    from helpers import StubTok, tiny_llama
    from ftkit.config import load as load_config
    from ftkit.kernels.patch import apply_kernels
    from ftkit.models import apply_adapter
    from ftkit.train import build_trainer
    cfg = load_config({"learning_rate": 1e-3, "micro_batch_size": 1, "sequence_len": 32, "sample_packing": True,
                       "optimizer": "adamw_torch", "output_dir": str(tmp_path), "adapter": "lora", "lora_r": 4,
                       "lora_target_linear": True, "datasets": [{"path": "unused.jsonl", "type": "completion"}]})
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in [5, 9, 7, 11, 6, 8, 10, 4] * 2:
        ids = torch.randint(3, 64, (n,), generator=g).tolist()
        cut = n - 2 if prompt_heavy else n // 3                 # prompt-heavy: logits only at trained positions
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    model = apply_adapter(cfg, tiny_llama(vocab_size=64, attn="ftkit_varlen"), quiet=True)
    s = build_trainer(cfg, data=(Dataset.from_list(rows), None), model=model, tokenizer=StubTok(), quiet=True)
    rep = apply_kernels(s.model, cfg, enable=None if kernels else {k: False for k in
                        ("lora_mlp", "lora_qkv", "lora_o", "rope", "rms_norm", "glu", "fused_linear_ce")},
                        interpret=True)
    assert bool(rep.patched) == kernels, str(rep)
    return s.trainer


@pytest.mark.parametrize("kernels,prompt_heavy", [(True, False), (True, True), (False, True)],
                         ids=["kernels-labels", "kernels-logits_to_keep", "no-kernels-logits_to_keep"])
def test_packed_lora_step_has_no_host_sync_in_ftkit(tmp_path, monkeypatch, kernels, prompt_heavy):
    tr = _trainer(tmp_path, kernels, prompt_heavy)
    batch = next(iter(tr.get_train_dataloader()))
    assert {"position_ids", "cu_seq_lens_q", "max_length_q"} <= set(batch) and isinstance(batch["max_length_q"], int)
    assert ("ftkit_keep" in batch) == prompt_heavy
    nib = tr._get_num_items_in_batch([batch], tr.args.device)
    before = [p.detach().clone() for p in tr.model.parameters() if p.requires_grad]
    with monkeypatch.context() as mp:
        c = SyncCounter().install(mp)
        loss = tr.training_step(tr.model, batch, nib)
    assert torch.isfinite(loss)
    grads = [p.grad for p in tr.model.parameters() if p.requires_grad]
    assert len(grads) == len(before) and all(g is not None for g in grads)      # the backward ran
    assert c.ours() == {}, f"host syncs in ftkit's step: {c.ours()}"
    # transformers' one known site (module docstring); anything else from outside ftkit is listed, not asserted
    print("syncs outside ftkit:", c.others())


def test_the_counter_sees_a_host_read_in_ftkit(monkeypatch):
    "The instrument can fail the test: the per-segment attention (reads cu_seq_lens on the host) is counted as ftkit's."
    from ftkit.packing import _segment_sdpa
    q = torch.randn(10, 2, 4)
    with monkeypatch.context() as mp:
        c = SyncCounter().install(mp)
        _segment_sdpa(q, q, q, torch.tensor([0, 4, 10], dtype=torch.int32), 0.5)
    assert any(what == "Tensor.tolist" and where.endswith("packing.py") for what, where, _ in c.ours())

"""No host sync at step boundaries on a GPU (`pytest -m gpu tests/test_gpu_nosync.py`).

- Logging one step late (`FtkitTrainer.log_without_sync`, `ftkit.train.defers_log`): the log history of a run equals
  the same run logged the transformers way (every step, in order, same loss / gradient norm / learning rate), and the
  run with ftkit's defaults (the decoder as a CUDA graph) makes fewer synchronizing CUDA calls than steps
  (`torch.cuda.set_sync_debug_mode`: the first step and the end of training may sync; transformers' eager mask
  creation, which the graphs skip, syncs once per forward).
- The gradient check deferred by one step (`ftkit.guard.device_skip`): a NaN gradient at step 3 is skipped on the
  device by the fused AdamW (`found_inf`), the run stops naming step 3 and the parameter, and no weight took it.

A Llama-shaped model with random weights, LoRA on all linears, bf16, packed rows, fused AdamW (ftkit's default)."""
import warnings

import pytest
import torch

from helpers import StubTok
from test_gpu import _cfg, _docs, _llama

pytestmark = pytest.mark.gpu


def _trainer(tmp_path, name, **kw):
    from datasets import Dataset
    from ftkit.models import apply_adapter
    from ftkit.train import build_trainer
    cfg = _cfg(tmp_path / name, adapter="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True,
               max_steps=8, learning_rate=1e-3, **kw)
    torch.manual_seed(0)
    m = apply_adapter(cfg, _llama(hidden=256, layers=2, heads=4, kv=2), quiet=True)
    return build_trainer(cfg, data=(Dataset.from_list(_docs(200)), None), model=m, tokenizer=StubTok(), quiet=True)


def _history(trainer):
    return [(h["step"], h["loss"], h.get("grad_norm"), h["learning_rate"]) for h in trainer.state.log_history if "loss" in h]


def test_logs_one_step_late_equal_transformers_logs(tmp_path):
    from ftkit.train import FtkitTrainer
    ref = _trainer(tmp_path, "ref")                 # the defaults: the decoder replayed as a CUDA graph
    ref.trainer.log_without_sync = False
    ref.trainer.train()
    new = _trainer(tmp_path, "new")
    assert new.trainer.log_without_sync is True and FtkitTrainer.log_without_sync is True
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            new.trainer.train()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    a, b = _history(ref.trainer), _history(new.trainer)
    assert [s for s, *_ in b] == list(range(1, 9)), b            # every step logged once, in order, with its own step
    for (sa, la, ga, lra), (sb, lb, gb, lrb) in zip(a, b):
        assert sa == sb and lra == lrb and abs(la - lb) <= 2e-3 * abs(la) and abs(ga - gb) <= 2e-2 * abs(ga) + 1e-6, (a, b)
    assert new.trainer.ftkit_pending_log is None                 # nothing left behind at the end
    syncs = [str(w.message)[:160] + " @ " + f"{w.filename}:{w.lineno}" for w in seen if "synchroniz" in str(w.message).lower()]
    per_step = len(syncs) / 8
    print(f"sync-debug warnings over 8 steps: {len(syncs)}", *sorted(set(syncs))[:12], sep="\n  ")
    # what is left must not be one per step: the first step (capture, allocator warm-up) and the last (final log) may sync
    assert per_step < 1, syncs


def test_nan_gradient_is_skipped_on_the_device_and_stops_the_run(tmp_path):
    from ftkit.guard import TrainingFault
    s = _trainer(tmp_path, "nan", cuda_graphs=False)
    tr = s.trainer
    named = [(n, p) for n, p in tr.model.named_parameters() if p.requires_grad]
    name, victim = named[0]
    state = {}
    victim.register_hook(lambda g: g * float("nan") if tr.state.global_step == 2 else g)      # the 3rd optimizer step

    class Snap:
        def __getattr__(self, n):
            if n.startswith("on_"): return lambda *a, **k: None
            raise AttributeError(n)

        def on_step_end(self, args, st, control, **kw):
            if st.global_step == 2: state["after2"] = {n: p.detach().clone() for n, p in named}
    tr.add_callback(Snap())
    with pytest.raises(TrainingFault) as e:
        tr.train()
    msg = str(e.value)
    assert "training stopped at step 3" in msg and f"the gradient of {name} is NaN" in msg, msg
    for n, p in named:
        assert torch.isfinite(p).all(), n
        assert torch.equal(p.detach(), state["after2"][n]), f"{n} changed at the skipped step"

"""The kernel patch step (ftkit.kernels.patch) on tiny random models of every covered architecture, on the CPU under
TRITON_INTERPRET=1: patched and unpatched models give the same loss and the same adapter gradients on packed rows,
the report says what was patched and skipped and why, config keys switch single kernels, and undo restores."""
import os

import torch  # noqa: E402

if not torch.cuda.is_available():                  # CPU machines (CI): Triton's interpreter, before the kernels exist
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from ftkit.kernels.patch import apply_kernels, switches  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU-interpreter tests; on a GPU machine tests/test_gpu_kernels.py covers the kernels")

ATTN7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCHS = {
    "llama": ({}, ATTN7),
    "mistral": ({"sliding_window": 6}, ATTN7),
    "qwen2": ({}, ATTN7),
    "qwen3": ({}, ATTN7),
    "gemma": ({"hidden_act": "gelu", "hidden_activation": "gelu"}, ATTN7),
    "gemma2": ({"final_logit_softcapping": 3.0, "attn_logit_softcapping": 20.0,
                "hidden_activation": "gelu_pytorch_tanh"}, ATTN7),
    "gemma3_text": ({"final_logit_softcapping": 3.0, "hidden_activation": "gelu_pytorch_tanh"}, ATTN7),
    "phi3": ({"pad_token_id": 0, "eos_token_id": 2, "bos_token_id": 1}, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


def tiny(mt, **kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
                use_cache=False)
    base.update(ARCHS[mt][0])
    base.update(kw)
    c = AutoConfig.for_model(mt, **base)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(c, attn_implementation="eager" if mt.startswith("gemma") else "sdpa").float()


def lora(model, targets, dropout=0.0, **kw):
    p = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, **kw))
    g = torch.Generator().manual_seed(1)
    for n, t in p.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return p.train()


IDS = torch.randint(0, 96, (1, 21), generator=torch.Generator().manual_seed(0))
POS = torch.tensor([list(range(8)) + list(range(13))])          # two packed documents in one row
LAB = IDS.clone()
LAB[0, :3] = -100


def loss_and_grads(model, seed=0):
    torch.manual_seed(seed)
    out = model(input_ids=IDS, position_ids=POS, labels=LAB)
    ps = [p for p in model.parameters() if p.requires_grad]
    return out.loss.detach(), torch.autograd.grad(out.loss, ps)


def assert_same(a, b, tol=2e-5):
    (la, ga), (lb, gb) = a, b
    assert abs(la.item() - lb.item()) <= tol * max(1.0, abs(la.item()))
    for x, y in zip(ga, gb):
        assert (x - y).abs().max().item() <= tol * max(1.0, y.abs().max().item())


@pytest.mark.parametrize("mt", list(ARCHS))
def test_patched_lora_model_matches_unpatched(mt):
    m = lora(tiny(mt), ARCHS[mt][1])
    ref = loss_and_grads(m)
    rep = apply_kernels(m, None, interpret=True)
    c = rep.counts()
    L = 2
    assert c["lora_mlp"] == L and c["lora_o"] == L and c["fused_linear_ce"] == 1 and c["rms_norm"] >= 2 * L + 1
    if mt in ("llama", "mistral", "qwen2", "qwen3"):
        assert c["lora_qkv"] == L and c["rope"] == L        # one fused node per layer, RoPE in place
    else:
        assert c["lora_qkv"] == (L if mt == "phi3" else 3 * L)   # each LoRA projection alone
        assert any(k == "rope" and "owns the attention forward only" in r for k, _, r in rep.skipped)
    assert_same(loss_and_grads(m), ref)
    assert rep.undo() == sum(c.values()) - c.get("rope", 0) * (mt in ("llama", "mistral", "qwen2", "qwen3"))
    assert "forward" not in m.get_base_model().model.layers[0].mlp.__dict__
    assert_same(loss_and_grads(m), ref, tol=0)


def test_full_finetune_patches_glu_norm_and_trainable_head():
    "No adapters: GLU + RMSNorm + RoPE + fused CE with a trainable head; every weight's gradient matches."
    m = tiny("llama").train()
    ref = loss_and_grads(m)
    rep = apply_kernels(m, None, interpret=True)
    c = rep.counts()
    assert c["glu"] == 2 and c["rope"] == 2 and c["fused_linear_ce"] == 1 and "lora_mlp" not in c
    assert_same(loss_and_grads(m), ref, tol=5e-5)


def test_dropout_matches_peft_with_the_same_seed():
    "Dropout > 0: masks come from peft's own dropout modules in peft's order, so a seeded run matches exactly."
    m = lora(tiny("llama"), ATTN7, dropout=0.2)
    ref = loss_and_grads(m, seed=7)
    rep = apply_kernels(m, None, interpret=True)
    assert rep.counts()["lora_mlp"] == 2
    assert_same(loss_and_grads(m, seed=7), ref)


def test_switches_from_config_keys():
    from types import SimpleNamespace as NS
    on = switches(NS(lora_mlp_kernel=False, liger_rope=None, cut_cross_entropy=False, chunked_cross_entropy=None,
                     liger_fused_linear_cross_entropy=None, activation_offloading=False, gradient_checkpointing=False))
    assert on["lora_mlp"] is False and on["rope"] is True and on["fused_linear_ce"] is False and on["offload"] is False
    assert switches(NS(cut_cross_entropy=False, chunked_cross_entropy=True))["fused_linear_ce"] is True
    assert switches(NS(gradient_checkpointing="offload"))["offload"] is True
    m = lora(tiny("llama"), ATTN7)
    rep = apply_kernels(m, NS(lora_mlp_kernel=False, liger_fused_linear_cross_entropy=False), interpret=True)
    c = rep.counts()
    assert "lora_mlp" not in c and "fused_linear_ce" not in c and c["glu"] == 2
    text = str(rep)
    assert "switched off by lora_mlp_kernel: false" in text
    assert "liger_fused_linear_cross_entropy / cut_cross_entropy / chunked_cross_entropy: false" in text


def test_skips_with_reasons():
    "DoRA layers, a modules_to_save head and an unknown architecture are skipped, each with its reason."
    m = lora(tiny("llama"), ATTN7, use_dora=True, modules_to_save=["lm_head"])
    rep = apply_kernels(m, None, interpret=True)
    reasons = {r for _, _, r in rep.skipped}
    assert any("DoRA" in r for r in reasons)
    assert any("LM head is ModulesToSaveWrapper" in r for r in reasons)
    assert "lora_mlp" not in rep.counts() and "fused_linear_ce" not in rep.counts()
    m2 = tiny("llama")
    m2.config.model_type = "mystery"
    rep2 = apply_kernels(m2, None, interpret=True)
    assert not rep2.patched and "'mystery' is not in ftkit's kernel registry" in str(rep2)


def test_cpu_model_is_not_patched_without_interpret_opt_in():
    m = lora(tiny("llama"), ATTN7)
    rep = apply_kernels(m, None)
    assert not rep.patched and "not on a CUDA GPU" in str(rep)


def test_disabled_adapter_and_eval_fall_back_to_the_original_forward():
    m = lora(tiny("llama"), ATTN7)
    with torch.no_grad():
        with m.disable_adapter():
            base = m(input_ids=IDS, position_ids=POS).logits
        m.eval()
        full = m(input_ids=IDS, position_ids=POS).logits
    apply_kernels(m, None, interpret=True)
    with torch.no_grad():
        with m.disable_adapter():
            assert torch.allclose(m(input_ids=IDS, position_ids=POS).logits, base, atol=1e-5)
        out = m(input_ids=IDS, position_ids=POS, labels=LAB)      # eval mode: logits come back
    assert out.logits is not None and torch.allclose(out.logits, full, atol=1e-5)


def test_second_apply_undoes_the_first():
    m = lora(tiny("qwen3"), ATTN7)
    r1 = apply_kernels(m, None, interpret=True)
    n = len(r1.patched)
    r2 = apply_kernels(m, None, interpret=True)
    assert not r1._undo and len(r2.patched) == n and m.ftkit_kernels is r2


def test_loss_uses_num_items_in_batch_like_transformers():
    "Gradient accumulation: the loss is the sum over trained tokens divided by num_items_in_batch."
    m = lora(tiny("llama"), ATTN7)
    n = torch.tensor(40)
    torch.manual_seed(0)
    ref = m(input_ids=IDS, position_ids=POS, labels=LAB, num_items_in_batch=n).loss
    apply_kernels(m, None, interpret=True)
    got = m(input_ids=IDS, position_ids=POS, labels=LAB, num_items_in_batch=n).loss
    assert abs(got.item() - ref.item()) < 1e-5


def test_activation_offloading_keeps_loss_and_grads(monkeypatch):
    "activation_offloading / gradient_checkpointing: offload: the forward runs under save_on_cpu; the math is unchanged."
    from types import SimpleNamespace as NS
    m = lora(tiny("llama"), ATTN7)
    ref = loss_and_grads(m)
    rep = apply_kernels(m, NS(activation_offloading=True, gradient_checkpointing=True), interpret=True)
    assert rep.counts().get("offload") == 1
    entered = []
    real = torch.autograd.graph.save_on_cpu

    class Recording(real):
        def __enter__(self):
            entered.append(self)
            return super().__enter__()
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Recording)
    assert_same(loss_and_grads(m), ref)
    assert len(entered) == 1
    rep.undo()
    assert "forward" not in m.get_base_model().__dict__
    loss_and_grads(m)
    assert len(entered) == 1


def test_gradient_checkpointing_recompute_matches():
    "Non-reentrant gradient checkpointing recomputes the fused functions (in-place RoPE, in-place GLU backward)."
    m = lora(tiny("qwen3"), ATTN7)
    m.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.get_base_model().enable_input_require_grads()
    ref = loss_and_grads(m)
    rep = apply_kernels(m, None, interpret=True)
    assert rep.counts()["lora_mlp"] == 2 and rep.counts()["rope"] == 2
    assert_same(loss_and_grads(m), ref)


def test_distillation_keeps_the_logits():
    "kd_trainer reads outputs.logits: the LM head stays transformers' (the other kernels still apply)."
    from types import SimpleNamespace as NS
    m = lora(tiny("llama"), ATTN7)
    c = apply_kernels(m, NS(kd_trainer=True), interpret=True).counts()
    assert "fused_linear_ce" not in c and c["lora_mlp"] == 2
    rep = apply_kernels(m, NS(kd_trainer=True), interpret=True)
    assert "kd_trainer: true" in str(rep)
    ids = torch.randint(0, m.config.vocab_size, (1, 12))
    out = m(input_ids=ids, labels=ids)
    assert out.logits is not None and out.logits.shape == (1, 12, m.config.vocab_size) and out.loss is not None


def test_torch_compile_key_keeps_transformers_modules():
    from types import SimpleNamespace as NS
    m = lora(tiny("llama"), ATTN7)
    rep = apply_kernels(m, NS(torch_compile=True), interpret=True)
    assert not rep.patched and "torch_compile: true" in str(rep)


def test_training_path_runs_the_patch_step_and_logs_its_report(tmp_path, capsys):
    "ftkit.train.build_trainer calls apply_kernels after the adapters: the report is on the model and in the log."
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from datasets import Dataset
    from helpers import tiny_llama
    from ftkit.config import load as load_config
    from ftkit.models import apply_adapter
    from ftkit.train import build_trainer

    class Tok:
        pad_token_id, eos_token_id, pad_token = 0, 2, "<pad>"

        def save_pretrained(self, d):
            pass
    cfg = load_config({"learning_rate": 1e-3, "micro_batch_size": 2, "sequence_len": 32, "sample_packing": True,
                       "optimizer": "adamw_torch", "output_dir": str(tmp_path), "adapter": "lora", "lora_r": 4,
                       "liger_rms_norm": False, "datasets": [{"path": "unused.jsonl", "type": "completion"}]})
    rows = Dataset.from_list([{"input_ids": [1, 5, 6, 7, 2], "labels": [1, 5, 6, 7, 2]}] * 16)
    model = apply_adapter(cfg, tiny_llama(vocab_size=64, attn="ftkit_varlen"), quiet=True)
    s = build_trainer(cfg, data=(rows, None), model=model, tokenizer=Tok(), quiet=False)
    rep = s.model.ftkit_kernels
    reasons = {r for _, _, r in rep.skipped}
    assert "switched off by liger_rms_norm: false" in reasons
    assert any("not on a CUDA GPU" in r for r in reasons) and not rep.patched     # CPU: nothing patched
    out = capsys.readouterr().out
    assert "kernels: none patched" in out and "skipped rms_norm: switched off by liger_rms_norm: false" in out

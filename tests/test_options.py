"""Training options beyond the defaults (ftkit.optim, PoSE, rope_scaling, NEFTune, unfrozen_parameters), each checked on the
real trainer and optimizer that `ftkit.train` builds for a tiny Llama on the CPU."""
import importlib.util
import math

import pytest
import torch
from datasets import Dataset

from ftkit.config import load as load_config, validate
from ftkit.errors import ConfigError
from ftkit.models import apply_adapter, load_model
from ftkit.optim import ADOPT, CombinedOptimizer, Grokfast
from ftkit.train import build_trainer, train
from helpers import StubTok, tiny_llama
from helpers import counting_data as _counting


def counting_data(n, seed=0, vocab=64):
    "Counting rows of 8 to 15 tokens (these tests were tuned on them)."
    return _counting(n, seed, vocab, lengths=(6, 14))


def _cfg(out, **kw):
    base = {"learning_rate": 1e-2, "micro_batch_size": 4, "sequence_len": 32, "sample_packing": True, "optimizer": "adamw_torch",
            "seed": 3, "output_dir": str(out), "logging_steps": 1, "save_strategy": "no", "lr_scheduler": "constant",
            "datasets": [{"path": "unused.jsonl", "type": "chat_template"}]}
    base.update(kw)
    return load_config(base)


def _model(cfg=None):
    m = tiny_llama(vocab_size=64, attn="ftkit_varlen", seed=0)
    return apply_adapter(cfg, m, quiet=True) if cfg is not None else m


def _run(cfg, data=None, model=None, **kw):
    return train(cfg, data=data or (counting_data(96), None), model=model if model is not None else _model(), tokenizer=StubTok(),
                 quiet=True, **kw)


def _inner(opt):
    "The optimizer under accelerate's wrapper."
    return getattr(opt, "optimizer", opt)


def _group_of(opt, p):
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


# ---------------------------------------------------------------- parameter groups

def test_lr_groups_and_embedding_lr_scale_are_the_trainers_groups(tmp_path):
    cfg = _cfg(tmp_path, lr_groups=[{"name": "o", "modules": ["self_attn.o_proj.weight"], "lr": 1e-4}],
               embedding_lr_scale=0.1, weight_decay=0.01, max_steps=2)
    m = _model()
    before = m.model.layers[0].self_attn.o_proj.weight.detach().clone()
    r = _run(cfg, model=m)
    opt = _inner(r.trainer.optimizer)
    o0, emb, head, q0, norm = (m.model.layers[0].self_attn.o_proj.weight, m.model.embed_tokens.weight, m.lm_head.weight,
                               m.model.layers[0].self_attn.q_proj.weight, m.model.norm.weight)
    assert (_group_of(opt, o0)["name"], _group_of(opt, o0)["lr"], _group_of(opt, o0)["weight_decay"]) == ("o", 1e-4, 0.01)
    assert _group_of(opt, emb) is _group_of(opt, head)
    assert (_group_of(opt, emb)["lr"], _group_of(opt, emb)["weight_decay"]) == (pytest.approx(1e-3), 0.0)   # 1e-2 × 0.1, no decay
    assert (_group_of(opt, q0)["lr"], _group_of(opt, q0)["weight_decay"]) == (1e-2, 0.01)
    assert (_group_of(opt, norm)["lr"], _group_of(opt, norm)["weight_decay"]) == (1e-2, 0.0)
    assert not torch.equal(before, o0.detach())                                  # the group trains
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))


def test_embedding_lr_and_a_group_that_claims_nothing(tmp_path):
    s = build_trainer(_cfg(tmp_path, embedding_lr=3e-5, max_steps=1), data=(counting_data(16), None), model=_model(),
                      tokenizer=StubTok(), quiet=True)
    opt = s.trainer.create_optimizer()
    assert _group_of(opt, s.model.model.embed_tokens.weight)["lr"] == 3e-5
    s = build_trainer(_cfg(tmp_path, lr_groups=[{"name": "x", "modules": ["o_proj.weight"], "lr": 1e-5}], adapter="lora", lora_r=2,
                           max_steps=1), data=(counting_data(16), None), model=_model(_cfg(tmp_path, adapter="lora", lora_r=2)),
                      tokenizer=StubTok(), quiet=True)
    with pytest.raises(ConfigError, match=r"lr_groups\[0\]\.modules.*claims no trainable parameter"):
        s.trainer.create_optimizer()


def test_loraplus_groups(tmp_path):
    cfg = _cfg(tmp_path, adapter="lora", lora_r=2, loraplus_lr_ratio=16, max_steps=1)
    s = build_trainer(cfg, data=(counting_data(16), None), model=_model(cfg), tokenizer=StubTok(), quiet=True)
    opt = s.trainer.create_optimizer()
    assert {g["name"] for g in opt.param_groups} == {"default", "loraplus_B"}
    for n, p in s.model.named_parameters():
        if p.requires_grad: assert _group_of(opt, p)["lr"] == (0.16 if "lora_B" in n else 1e-2), n


# ---------------------------------------------------------------- schedules

def _cos(a, b, pct):
    return b + (a - b) / 2 * (1 + math.cos(math.pi * pct))


def test_one_cycle_curve(tmp_path):
    T, W, peak, div = 8, 3, 1e-2, 10.0
    r = _run(_cfg(tmp_path, lr_scheduler="one_cycle", lr_div_factor=div, warmup_steps=W, max_steps=T))
    assert r.global_step == T
    lo, end = peak / div, peak / div / 1e4
    for s in range(1, T + 1):                     # the lr logged at step s is the one that step used (scheduler step s-1)
        k = s - 1
        want = _cos(lo, peak, k / (W - 1)) if k <= W - 1 else _cos(peak, end, (k - (W - 1)) / (T - 1 - (W - 1)))
        assert r.lrs[s] == pytest.approx(want, rel=1e-6), s
    assert r.lrs[1] == pytest.approx(1e-3) and r.lrs[W] == pytest.approx(peak)


def test_rex_curve(tmp_path):
    T, W, peak, floor = 10, 2, 1e-2, 0.1
    r = _run(_cfg(tmp_path, lr_scheduler="rex", warmup_steps=W, max_steps=T, cosine_min_lr_ratio=floor))
    for s in range(1, T + 1):
        k = s - 1
        if k < W: want = peak * k / W
        else:
            p = (k - W) / (T - W)
            want = peak * (floor + (1 - floor) * (1 - p) / (1 - p / 2))
        assert r.lrs[s] == pytest.approx(want, rel=1e-6, abs=1e-12), s
    assert r.lrs[7] == pytest.approx(peak * (0.1 + 0.9 * 0.5 / 0.75))          # halfway: 0.7 of the peak, above linear's 0.55


def test_cosine_constant_tail_and_quadratic_warmup(tmp_path):
    T, W, peak = 10, 4, 1e-2
    r = _run(_cfg(tmp_path, lr_scheduler="cosine", warmup_steps=W, max_steps=T, lr_quadratic_warmup=True,
                  cosine_constant_lr_ratio=0.6, cosine_min_lr_ratio=0.2))
    assert [r.lrs[s] for s in (1, 2, 3)] == pytest.approx([0.0, peak / 16, peak / 4])     # (k / W)²
    assert r.lrs[W + 1] == pytest.approx(peak)
    assert [r.lrs[s] for s in (7, 8, 9, 10)] == pytest.approx([peak * 0.2] * 4)            # floor from 60% of the run on
    assert r.lrs[6] == pytest.approx(peak * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 1 / 2))))


def test_schedule_options_validate():
    ps = validate({"learning_rate": 1e-4, "lr_scheduler": "one_cycle", "lr_div_factor": 10})[1]
    assert not [p for p in ps if p.level == "error"] and not [p for p in ps if p.key == "lr_div_factor"]
    ps = validate({"learning_rate": 1e-4, "lr_scheduler": "linear", "lr_div_factor": 10})[1]
    assert [p.level for p in ps if p.key == "lr_div_factor"] == ["warning"]
    ps = validate({"learning_rate": 1e-4, "lr_scheduler": "rex", "rl": "dpo"})[1]
    assert [p.level for p in ps if p.key == "lr_scheduler"] == ["error"]
    ps = validate({"learning_rate": 1e-4, "lr_scheduler": "rex", "lr_scheduler_kwargs": {"x": 1}, "cosine_min_lr_ratio": 0.1})[1]
    assert [(p.key, p.level) for p in ps] == [("lr_scheduler_kwargs", "warning")]                # rex ignores the kwargs, uses the floor
    ps = validate({"learning_rate": 1e-4, "lr_scheduler": "linear", "cosine_min_lr_ratio": 0.1})[1]
    assert [(p.key, p.level) for p in ps] == [("cosine_min_lr_ratio", "warning")]


# ---------------------------------------------------------------- rope_scaling

@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_llama(vocab_size=64).save_pretrained(d)
    return d


@pytest.mark.parametrize("rope,check", [
    ({"type": "linear", "factor": 4.0}, lambda rot, base: torch.allclose(rot.inv_freq, base.inv_freq / 4) and rot.attention_scaling == 1.0),
    ({"rope_type": "dynamic", "factor": 2.0}, lambda rot, base: rot.rope_type == "dynamic"),
    ({"rope_type": "yarn", "factor": 4.0}, lambda rot, base: rot.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
     and not torch.allclose(rot.inv_freq, base.inv_freq)),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
     lambda rot, base: rot.rope_type == "llama3" and rot.inv_freq[-1] < base.inv_freq[-1] and rot.inv_freq[0] == base.inv_freq[0]),
])
def test_rope_scaling_reaches_the_loaded_model(saved_llama, rope, check):
    base = load_model(load_config({"learning_rate": 1e-4, "base_model": str(saved_llama)}), quiet=True)
    m = load_model(load_config({"learning_rate": 1e-4, "base_model": str(saved_llama), "rope_scaling": rope}), quiet=True)
    kind = rope.get("rope_type", rope.get("type"))
    assert m.config.rope_parameters["rope_type"] == kind and m.config.rope_parameters["rope_theta"] == base.config.rope_parameters["rope_theta"]
    assert check(m.model.rotary_emb, base.model.rotary_emb)


def test_rope_scaling_reaches_a_reward_model(saved_llama):
    from ftkit.rl import load_rl_model
    cfg = load_config({"learning_rate": 1e-4, "base_model": str(saved_llama), "reward_model": True, "rope_scaling": {"type": "linear", "factor": 4.0}})
    m = load_rl_model(cfg, StubTok(), "seqcls")
    base = tiny_llama(vocab_size=64).model.rotary_emb
    assert m.config.num_labels == 1 and torch.allclose(m.model.rotary_emb.inv_freq, base.inv_freq / 4)

def test_rope_scaling_errors(saved_llama):
    _, ps, *_ = validate({"learning_rate": 1e-4, "rope_scaling": {"type": "stretchy", "factor": 2}})
    assert [p.key for p in ps if p.level == "error"] == ["rope_scaling"]
    with pytest.raises(ConfigError, match="low_freq_factor"):
        load_model(load_config({"learning_rate": 1e-4, "base_model": str(saved_llama), "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
                   quiet=True)


# ---------------------------------------------------------------- PoSE

def _segments(batch):
    cu = batch["cu_seq_lens_q"].tolist()
    pos = batch["position_ids"].reshape(-1).tolist()
    return [pos[a:b] for a, b in zip(cu, cu[1:])]


@pytest.mark.parametrize("packing", [True, False])
def test_pose_positions_skip_within_the_context_in_training_only(tmp_path, packing):
    cfg = _cfg(tmp_path, use_pose=True, pose_max_context_len=200, pose_num_chunks=3, max_steps=2, sample_packing=packing,
               eval_strategy="no")
    s = build_trainer(cfg, data=(counting_data(32), counting_data(8, seed=1)), model=_model(), tokenizer=StubTok(), quiet=True)
    train_batch = next(iter(s.trainer.get_train_dataloader()))
    eval_batch = next(iter(s.trainer.get_eval_dataloader()))
    if packing:
        segs = [p for p in _segments(train_batch) if len(p) > 3 and p[0] == 0]     # the samples (not the padding tail)
        assert segs and all(all(b > a for a, b in zip(p, p[1:])) for p in segs)
        assert all(max(p) < 200 for p in segs) and any(max(p) > len(p) - 1 for p in segs)      # skipped, within the context
        assert all(p == list(range(len(p))) for p in _segments(eval_batch))
    else:
        mask, pos = train_batch["attention_mask"], train_batch["position_ids"]
        rows = [pos[i][mask[i].bool()].tolist() for i in range(len(pos))]
        assert all(all(b > a for a, b in zip(r, r[1:])) and r[0] == 0 and r[-1] < 200 for r in rows)
        assert any(r[-1] > len(r) - 1 for r in rows) and "position_ids" not in eval_batch
    s.trainer.train()                               # and the model trains on them
    assert s.trainer.state.global_step == 2


def test_pose_validation():
    ps = validate({"learning_rate": 1e-4, "use_pose": True, "sequence_len": 512})[1]
    assert [p.key for p in ps if p.level == "error"] == ["pose_max_context_len"]
    ps = validate({"learning_rate": 1e-4, "use_pose": True, "pose_max_context_len": 4096, "sample_packing": True, "sdp_attention": True})[1]
    assert [p.key for p in ps if p.level == "error"] == ["sdp_attention"]        # sdpa finds packed samples from the positions
    assert not validate({"learning_rate": 1e-4, "use_pose": True, "pose_max_context_len": 4096, "sample_packing": True})[1]


# ---------------------------------------------------------------- NEFTune

class EmbeddingTap:
    "Records (training?, max |output − clean lookup|, length, width) of every input-embedding call."
    trainer = None

    def __init__(self): self.seen, self.handle = [], None

    def on_train_begin(self, args, state, control, model=None, **kw):
        emb = model.get_input_embeddings()
        def hook(mod, inp, out):
            clean = torch.nn.functional.embedding(inp[0], mod.weight)
            self.seen.append((mod.training, float((out - clean).detach().abs().max()), out.shape[1], out.shape[2]))
        self.handle = emb.register_forward_hook(hook)

    def __getattr__(self, name):            # every other callback event: nothing to do
        if name.startswith("on_"): return lambda *a, **k: None
        raise AttributeError(name)


def test_neftune_noise_in_training_not_in_eval(tmp_path):
    alpha = 5.0
    tap = EmbeddingTap()
    cfg = _cfg(tmp_path, neftune_noise_alpha=alpha, max_steps=2, eval_steps=1, val_set_size=0.1, sample_packing=False)
    _run(cfg, data=(counting_data(32), counting_data(8, seed=1)), callbacks=[tap])
    train_calls = [s for s in tap.seen if s[0]]
    eval_calls = [s for s in tap.seen if not s[0]]
    assert train_calls and eval_calls
    assert all(0 < d <= alpha / math.sqrt(L * D) * (1 + 1e-5) for _, d, L, D in train_calls)   # NEFTune's uniform noise bound
    assert all(d == 0 for _, d, _, _ in eval_calls)


# ---------------------------------------------------------------- unfrozen_parameters

def test_unfrozen_parameters_train_exactly_the_matches(tmp_path):
    cfg = _cfg(tmp_path, unfrozen_parameters=[r"layers\.1\.mlp\.", r"^model\.norm\."], max_steps=2)
    m = _model(cfg)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    r = _run(cfg, model=m)
    matched = {n for n in before if (".layers.1.mlp." in n or n.startswith("model.norm."))}
    changed = {n for n, p in m.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == matched and len(matched) == 4
    in_opt = {id(p) for g in _inner(r.trainer.optimizer).param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in m.named_parameters() if n in matched}


def test_unfrozen_parameters_validation():
    ps = validate({"learning_rate": 1e-4, "unfrozen_parameters": ["[oops"]})[1]
    assert [p.key for p in ps if p.level == "error"] == ["unfrozen_parameters[0]"]
    ps = validate({"learning_rate": 1e-4, "unfrozen_parameters": ["mlp"], "adapter": "lora"})[1]
    assert [p.level for p in ps if p.key == "unfrozen_parameters"] == ["warning"]


# ---------------------------------------------------------------- optimizers

def _fixed_loss(model, data):
    batch = data.select(range(16))
    with torch.no_grad():
        return sum(float(model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss) for r in batch) / 16


OPTIMIZERS = [
    ("muon", {"learning_rate": 2e-2}, lambda o: isinstance(o, CombinedOptimizer) and isinstance(o.optimizers[0], torch.optim.Muon), None),
    ("lion", {"learning_rate": 2e-3}, lambda o: type(o).__name__ == "Lion", "lion_pytorch"),
    ("adopt_adamw", {"learning_rate": 1e-2}, lambda o: isinstance(o, ADOPT), None),
    ("schedule_free_adamw", {"learning_rate": 1e-2, "warmup_steps": 2},
     lambda o: type(o).__name__ == "AdamWScheduleFree" and not o.param_groups[0]["train_mode"], "schedulefree"),   # eval weights at the end
    ("adamw_torch", {"learning_rate": 1e-2, "grokfast_alpha": 0.9, "grokfast_lamb": 1.0}, lambda o: isinstance(o, torch.optim.AdamW), None),
]


@pytest.mark.parametrize("name,extra,is_it,package", OPTIMIZERS, ids=[o[0] + ("+grokfast" if "grokfast_alpha" in o[1] else "") for o in OPTIMIZERS])
def test_optimizer_takes_steps_and_reduces_loss(tmp_path, name, extra, is_it, package):
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"optimizer {name} needs the {package} package: pip install 'ftkit[optimizers]'")
    data = counting_data(96)
    m = _model()
    start = _fixed_loss(m, data)
    r = _run(_cfg(tmp_path, optimizer=name, max_steps=12, **extra), data=(data, None), model=m)
    assert r.global_step == 12 and is_it(_inner(r.trainer.optimizer))
    assert _fixed_loss(m, data) < start - 0.1, (name, start)
    if "grokfast_alpha" in extra:
        g = next(c for c in r.trainer.callback_handler.callbacks if isinstance(c, Grokfast))
        assert (g.alpha, g.lamb) == (0.9, 1.0) and len(g.avg) == len(list(m.parameters()))


def test_muon_with_lr_groups_keeps_group_lrs(tmp_path):
    s = build_trainer(_cfg(tmp_path, optimizer="muon", lr_groups=[{"name": "q", "modules": ["q_proj"], "lr": 1e-4}], max_steps=1),
                      data=(counting_data(16), None), model=_model(), tokenizer=StubTok(), quiet=True)
    opt = s.trainer.create_optimizer()
    q = s.model.model.layers[1].self_attn.q_proj.weight
    g = _group_of(opt.optimizers[0], q)
    assert g["name"] == "q" and g["lr"] == 1e-4 and _group_of(opt, q) is g


def test_grokfast_plugin_name_switches_it_on(tmp_path):
    from ftkit.optim import callbacks
    cbs = callbacks(_cfg(tmp_path, plugins=["axolotl.integrations.grokfast.GrokfastPlugin"]))
    assert [(type(c).__name__, c.alpha, c.lamb) for c in cbs] == [("Grokfast", 0.98, 2.0)]
    assert not [p for p in validate({"learning_rate": 1e-4, "plugins": ["axolotl.integrations.grokfast.GrokfastPlugin"]})[1]
                if p.key.startswith("plugins")]


def test_rl_trainer_gets_groups_optimizer_and_grokfast(tmp_path):
    "The rl: trainers (here DPO) get the same optimizer factory and callbacks as SFT."
    from test_rl import base_cfg, pairs, tiny_model, write_jsonl
    from ftkit.models import load_tokenizer
    tok = load_tokenizer(load_config({"learning_rate": 1e-5}), quiet=True)
    p = write_jsonl(tmp_path / "pref.jsonl", pairs(["apples", "rivers", "music", "stars"]))
    cfg = base_cfg(tmp_path, rl="dpo", max_steps=2, optimizer="adopt_adamw", grokfast_lamb=1.0, datasets=[{"path": p, "type": "chatml.intel"}],
                   lr_groups=[{"name": "mlp", "modules": ["mlp."], "lr": 1e-4}])
    s = build_trainer(cfg, model=tiny_model(tok), tokenizer=tok, quiet=True)
    s.trainer.train()
    opt = _inner(s.trainer.optimizer)
    assert isinstance(opt, ADOPT) and {g["name"]: g["lr"] for g in opt.param_groups}["mlp"] == 1e-4
    assert s.trainer.state.global_step == 2 and any(isinstance(c, Grokfast) and c.avg for c in s.trainer.callback_handler.callbacks)


@pytest.mark.gpu
@pytest.mark.parametrize("name,lr,package", [("muon", 2e-2, None), ("adopt_adamw", 2e-3, None), ("lion", 5e-4, "lion_pytorch"),
                                             ("schedule_free_adamw", 2e-3, "schedulefree")])
def test_gpu_optimizers_learn_in_bf16(tmp_path, name, lr, package):
    "Each optimizer ftkit builds (or passes to transformers) trains a bf16 Llama on the GPU: the loss falls by a fifth in 30 steps."
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"optimizer {name} needs the {package} package: pip install 'ftkit[optimizers]'")
    m = tiny_llama(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, attn="ftkit_varlen", seed=0).to("cuda", torch.bfloat16)
    cfg = _cfg(tmp_path, optimizer=name, learning_rate=lr, bf16=True, max_steps=30, micro_batch_size=8, sequence_len=128,
               **({"warmup_steps": 3} if name.startswith("schedule_free") else {}))
    r = _run(cfg, data=(counting_data(400), None), model=m)
    losses = [r.losses[s] for s in sorted(r.losses)]
    assert r.global_step == 30 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, (name, losses)

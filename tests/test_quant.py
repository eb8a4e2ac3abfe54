"""Quantization (ftkit.quant): `qat:` fake-quantizes the linear layers during training and converts after, `ftkit quantize`
rounds the trained model to int8 / int4 weights (saved, reloaded, generating, size and eval loss reported), `fp8: true`
trains with torchao's float8 linears on GPUs that have float8 matmuls, `gptq: true` needs its backend.

Models are tiny Llamas built from a config with random weights and a tokenizer trained here; nothing is downloaded.
torchao is the `torchao` extra (installed by `make install`); without it these tests skip and say so."""
import importlib.util
import json

import pytest
import torch

from helpers import make_cfg, tiny_llama

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed: pip install 'ftkit[torchao]'")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    "A tiny Llama (dimensions divisible by 16 for float8) with a local BPE tokenizer, saved as a model folder, and a dataset."
    from ftkit_test_tokenizers import llama3
    d = tmp_path_factory.mktemp("quant")
    tok = llama3()
    m = tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=128, head_dim=16,
                   pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    m.save_pretrained(d / "base"); tok.save_pretrained(d / "base")
    words = "the quick brown fox jumps over the lazy dog".split()
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(24))} for i in range(48)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _cfg(d, out, **kw):
    return make_cfg(base_model=str(d / "base"), datasets=[{"path": str(d / "data.jsonl"), "type": "completion"}],
                    val_set_size=0.25, sequence_len=64, micro_batch_size=4, gradient_accumulation_steps=1, learning_rate=3e-3,
                    logging_steps=1, save_strategy="no", output_dir=str(d / out), dataset_prepared_path=str(d / "prep"),
                    seed=0, **kw)


class _Watch:
    "Records, at every optimizer step, how many fake-quantized linears the model has and whether they are on."
    def __new__(cls):
        from transformers import TrainerCallback
        from ftkit.quant import fake_quantized

        class W(TrainerCallback):
            def __init__(self): self.seen = []
            def on_step_end(self, args, state, control, model=None, **kw):
                fq = [m for m in model.modules() if hasattr(m, "weight_fake_quantizer")]
                self.seen.append((state.global_step, len(fake_quantized(model)), all(m.weight_fake_quantizer.enabled for m in fq)))
        return W()


@pytest.fixture(scope="module")
def qat_run(base_dir):
    from ftkit.train import train
    cfg = _cfg(base_dir, "qat", max_steps=12, qat={"weight_dtype": "int4", "group_size": 16, "fake_quant_after_n_steps": 2})
    w = _Watch()
    return cfg, train(cfg, callbacks=[w], quiet=True), w


@needs_torchao
def test_qat_fake_quantizes_during_training_and_converts_after(qat_run):
    from ftkit.quant import fake_quantized
    cfg, res, w = qat_run
    # 2 layers x 7 linears fake-quantized at every step; off for the first fake_quant_after_n_steps steps, then on
    assert [n for _, n, _ in w.seen] == [14] * 12
    assert [on for _, _, on in w.seen] == [False, False] + [True] * 10
    losses = [res.losses[s] for s in sorted(res.losses)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses            # it learns under fake quantization
    assert fake_quantized(res.model) == []                                      # converted when training ended
    assert all(type(m) is torch.nn.Linear for n, m in res.model.named_modules() if n.endswith("proj"))
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(cfg.output_dir)                # saved as a plain model
    assert torch.equal(saved.model.layers[0].mlp.up_proj.weight, res.model.model.layers[0].mlp.up_proj.weight.cpu())


@needs_torchao
def test_quantize_after_qat_int4_saves_reloads_generates_and_reports(qat_run, capsys):
    "`ftkit quantize` on the QAT run: the qat: scheme (int4, groups of 16) rounds the trained model; report printed and saved."
    from ftkit.cli import main
    from transformers import AutoModelForCausalLM
    cfg, _, _ = qat_run
    path = cfg.output_dir + ".yml"
    open(path, "w").write(cfg.to_yaml())
    assert main(["quantize", path]) == 0
    out = capsys.readouterr().out
    assert "int4w-g16" in out and "eval loss" in out and "size" in out
    rep = json.loads(open(cfg.output_dir + "/quantized/quantization.json").read())
    assert rep["quantized_layers"] == 14 and rep["eval_tokens"] > 0 and rep["sample"]
    assert abs(rep["eval_loss_delta"]) < 0.5 and rep["bytes_after"] < rep["bytes_before"]
    q = AutoModelForCausalLM.from_pretrained(rep["output_dir"])
    w = q.model.layers[0].mlp.up_proj.weight
    assert type(w).__name__ == "IntxUnpackedToInt8Tensor" and int(w.qdata.min()) >= -8 and int(w.qdata.max()) <= 7  # int4 range


@needs_torchao
def test_ptq_int8_is_smaller_reloads_generates_and_measures_eval_loss(base_dir):
    "Before any training, quantize quantizes base_model: int8 weights, about a quarter of the float32 linears."
    from ftkit.quant import quantize
    from transformers import AutoModelForCausalLM
    cfg = _cfg(base_dir, "ptq", quantization={"weight_dtype": "int8", "quantize_embedding": True})
    r = quantize(cfg, quiet=True)
    assert r.source.startswith("the base model") and r.scheme == "int8w-g32"
    assert r.bytes_after < 0.4 * r.bytes_before, (r.bytes_before, r.bytes_after)      # embeddings and head quantized too
    assert r.eval_loss_before is not None and abs(r.eval_loss_delta) < 0.05 and r.eval_tokens > 0
    q = AutoModelForCausalLM.from_pretrained(r.output_dir)
    assert type(q.model.embed_tokens.weight).__name__ == "IntxUnpackedToInt8Tensor"
    ids = torch.tensor([[1, 5, 9]])
    assert q.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_quantize_without_a_scheme_is_a_clear_error(base_dir):
    from ftkit.errors import UserError
    from ftkit.quant import quantize
    with pytest.raises(UserError, match="no `quantization:`"):
        quantize(_cfg(base_dir, "none"), quiet=True)


def test_fp8_on_a_machine_without_float8_matmuls_is_a_config_error(tmp_path, capsys):
    from ftkit.cli import main
    from ftkit.config import Env, resolve
    from ftkit.errors import ConfigError
    for env in (Env(), Env(cuda=True, bf16_supported=True)):          # CPU; an Ampere-class GPU (bf16, no float8)
        with pytest.raises(ConfigError, match="compute capability 8.9"):
            resolve(make_cfg(fp8=True), env)
    if not torch.cuda.is_available():                                  # this machine: `ftkit validate` says it, exit 2
        p = tmp_path / "c.yml"; p.write_text("learning_rate: 1.0e-4\nfp8: true\n")
        assert main(["validate", str(p)]) == 2
        assert "float8 training needs a GPU" in capsys.readouterr().err


def test_quantization_rules():
    from ftkit.config import validate
    def errors(**kw): return [p.message for p in validate({"learning_rate": 1e-4, **kw})[1] if p.level == "error"]
    assert any("full fine-tunes" in m for m in errors(fp8=True, adapter="lora"))
    assert any("cannot be used together" in m for m in errors(fp8=True, qat={"weight_dtype": "int8"}))
    assert any("base stays frozen" in m for m in errors(qat={"weight_dtype": "int8"}, adapter="lora"))
    assert any("'int4' or 'int8'" in m for m in errors(quantization={"weight_dtype": "nvfp4"}))
    assert not errors(qat={"weight_dtype": "int4", "activation_dtype": "int8", "group_size": 64}) or importlib.util.find_spec("torchao") is None


@pytest.mark.skipif(importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("gptqmodel") is not None,
                    reason="the GPTQ backend is installed here")
def test_gptq_without_its_backend_is_a_clear_error():
    from ftkit.config import load
    from ftkit.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        load({"learning_rate": 1e-4, "adapter": "lora", "gptq": True})
    assert "pip install optimum gptqmodel" in str(e.value)


def test_gptq_on_a_plain_model_is_refused(base_dir):
    from ftkit.errors import ConfigError
    from ftkit.models import ModelSource, _check_gptq
    with pytest.raises(ConfigError, match="not a GPTQ checkpoint"):
        _check_gptq(ModelSource(str(base_dir / "base")))


@needs_torchao
def test_float8_linears_train_with_emulated_float8_on_the_cpu():
    "The CPU half of the fp8 path: the swap ftkit's plugin makes, trained with torchao's float8 emulation (any token count)."
    from ftkit.quant import float8_linears, prepare_fp8
    m = prepare_fp8(tiny_llama(hidden_size=64, intermediate_size=128, head_dim=16).to(torch.bfloat16), emulate=True)
    assert len(float8_linears(m)) == 14 and "lm_head" not in " ".join(float8_linears(m))
    opt, ids = torch.optim.AdamW(m.parameters(), 3e-3), torch.randint(3, 128, (3, 13))
    losses = []
    for _ in range(5):
        loss = m(input_ids=ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad(); losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.gpu
@needs_torchao
def test_fp8_trains_with_float8_linears_on_the_gpu(base_dir):
    "H100/H200: fp8: true swaps the linears for Float8Linear before training; a few steps run and the loss falls."
    from ftkit.quant import float8_linears
    from ftkit.train import train
    from transformers import TrainerCallback
    if torch.cuda.get_device_capability(0) < (8, 9): pytest.skip("this GPU has no float8 matmuls")

    class Seen(TrainerCallback):
        n = []
        def on_step_end(self, args, state, control, model=None, **kw): self.n.append(len(float8_linears(model)))
    s = Seen()
    res = train(_cfg(base_dir, "fp8", max_steps=10, fp8=True, bf16=True), callbacks=[s], quiet=True)
    assert s.n == [14] * 10
    losses = [res.losses[k] for k in sorted(res.losses)]
    assert all(l == l for l in losses) and losses[-1] < losses[0], losses


@pytest.mark.gpu
@needs_torchao
def test_int4_on_the_gpu_is_packed_two_weights_per_byte(base_dir):
    from ftkit.quant import quantize
    from transformers import AutoModelForCausalLM
    r = quantize(_cfg(base_dir, "ptq4", quantization={"weight_dtype": "int4", "group_size": 32}), quiet=True)
    assert r.device == "cuda" and r.sample
    q = AutoModelForCausalLM.from_pretrained(r.output_dir, device_map="cuda")
    assert type(q.model.layers[0].mlp.up_proj.weight).__name__ == "Int4TilePackedTo4dTensor"
    assert abs(r.eval_loss_delta) < 0.5

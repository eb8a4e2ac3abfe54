"""Metadata for the config reference that the schema does not carry: which methods a key applies to, and
an example value where the one derived from the type would say little. Descriptions, types, defaults and
allowed values come from the pydantic schema (ftkit.config); keys not listed here get the section's
methods and an example derived from their type."""

ALL = "all"
SFT_RL = "all (SFT and `rl:`)"
PREF = "dpo, ipo, kto, orpo, simpo"

# methods a section's keys apply to, unless the key is listed in METHODS
SECTION_METHODS = {
    "adapter": "LoRA / QLoRA (`adapter:` set)",
    "rl": PREF + ", grpo",
    "trl": "grpo (options TRL trainers read)",
    "datasets": ALL,
    "special_tokens": ALL,
    "type": "user-defined formats (`type:` as a mapping)",
    "qat": "full fine-tune (SFT)",
    "quantization": "`ftkit quantize` (after training)",
}

METHODS = {
    "rl": "dpo, ipo, kto, orpo, simpo, grpo",
    "rl_beta": "dpo, ipo, kto, simpo",
    "rl_adapter_ref_model": "dpo, ipo, kto (with an adapter)",
    "dpo_use_weighting": "dpo", "dpo_use_logits_to_keep": "dpo, ipo", "dpo_label_smoothing": "dpo",
    "dpo_norm_loss": "dpo", "dpo_padding_free": "dpo, ipo", "dpo_generate_during_eval": "dpo, ipo", "rpo_alpha": "dpo",
    "orpo_alpha": "orpo", "simpo_gamma": "simpo", "cpo_alpha": "simpo",
    "kto_desirable_weight": "kto", "kto_undesirable_weight": "kto",
    "reward_model": "reward model", "process_reward_model": "process reward model",
    "center_rewards_coefficient": "reward model",
    "trl.beta": "dpo, ipo, kto, grpo",
    "qat": "full fine-tune (SFT)", "quantization": "`ftkit quantize` (after training)", "fp8": "full fine-tune on a GPU with float8 (Ada, Hopper)",
    "gptq": "LoRA on a GPTQ base",
    "load_in_4bit": "QLoRA", "load_in_8bit": "LoRA (8-bit base)", "adapter": ALL,
    "unfrozen_parameters": "full fine-tune", "bnb_config_kwargs": "QLoRA / 8-bit",
    "sample_packing": "SFT", "pad_to_sequence_len": "SFT", "train_on_inputs": "SFT",
    "datasets.field_prompt": "preference data", "datasets.field_chosen": "preference data",
    "datasets.field_rejected": "preference data", "datasets.field_completion": "kto", "datasets.field_label": "kto",
    "datasets.step_separator": "process reward model", "datasets.max_completion_length": "process reward model",
    "datasets.train_on_last_step_only": "process reward model",
    "datasets.logprobs_field": "distillation", "datasets.temperature": "distillation",
    "deepspeed": "multi-GPU", "fsdp_version": "multi-GPU", "fsdp_config": "multi-GPU", "fsdp": "multi-GPU",
    "fsdp_final_state_dict_type": "multi-GPU", "ddp_timeout": "multi-GPU", "ddp_bucket_cap_mb": "multi-GPU",
    "ddp_broadcast_buffers": "multi-GPU", "ddp_find_unused_parameters": "multi-GPU",
    "context_parallel_size": "multi-GPU", "tensor_parallel_size": "multi-GPU",
    "relora": "SFT with `adapter: lora`", "relora_prune_ratio": "SFT with `adapter: lora` (relora)",
    "relora_cpu_offload": "SFT with `adapter: lora` (relora)", "jagged_restart_steps": "SFT",
    "jagged_restart_warmup_steps": "SFT", "jagged_restart_anneal_steps": "SFT",
    "lisa_n_layers": "full fine-tune (SFT)", "lisa_step_interval": "full fine-tune (SFT)", "lisa_layers_attribute": "full fine-tune (SFT)",
    "spectrum_top_fraction": "full fine-tune (SFT)", "spectrum_model_name": "full fine-tune (SFT)",
    "kd_trainer": "distillation (SFT)", "kd_ce_alpha": "distillation (SFT)", "kd_alpha": "distillation (SFT)",
    "kd_temperature": "distillation (SFT)", "kd_zscore_base_temp": "distillation (SFT)", "kd_top_k_before_softmax": "distillation (SFT)",
}

EXAMPLES = {
    "qat": {"weight_dtype": "int4", "group_size": 32}, "quantization": {"weight_dtype": "int8"},
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "base_model_config": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "type_of_model": "AutoModelForCausalLM", "model_type": "AutoModelForCausalLM", "tokenizer_type": "AutoTokenizer",
    "tokenizer_config": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "chat_template": "chatml", "datasets.chat_template": "chatml",
    "datasets.path": "examples/data/reverse_words.jsonl", "datasets.type": "chat_template",
    "datasets.split": "train", "datasets.field_messages": "messages",
    "datasets.message_property_mappings": {"role": "from", "content": "value"},
    "datasets.roles_to_train": ["assistant"], "datasets.roles": {"user": ["human"], "assistant": ["gpt"]}, "datasets.ds_type": "json",
    "datasets.data_files": ["train.jsonl"], "datasets.field": "text",
    "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "v_proj"], "lora_modules_to_save": ["embed_tokens", "lm_head"],
    "learning_rate": 2e-4, "micro_batch_size": 2, "gradient_accumulation_steps": 4, "num_epochs": 3,
    "max_steps": 60, "warmup_steps": 10, "sequence_len": 2048, "optimizer": "adamw_torch_fused",
    "lr_scheduler": "cosine", "output_dir": "./outputs/my-run", "dataset_prepared_path": "last_run_prepared",
    "val_set_size": 0.05, "seed": 42, "logging_steps": 1, "eval_steps": 50, "save_steps": 100,
    "special_tokens": {"pad_token": "<|im_end|>"}, "special_tokens.eos_token": "<|im_end|>",
    "special_tokens.pad_token": "<|im_end|>", "special_tokens.bos_token": "<|im_start|>",
    "eot_tokens": ["<|im_end|>"], "tokens": ["<|tool|>"],
    "rl": "dpo", "rl_beta": 0.1, "deepspeed": "examples/deepspeed/zero2.json", "fsdp_version": 2,
    "fsdp_config": {"reshard_after_forward": True}, "trl.reward_funcs": ["my_rewards.exact_match"],
    "trl.num_generations": 4, "trl.beta": 0.04, "trl.loss_type": "dr_grpo",
    "plugins": ["my_plugin.Plugin"], "trainer_cls": "my_module.MyTrainer",
    "jagged_restart_steps": 150, "jagged_restart_warmup_steps": 10, "jagged_restart_anneal_steps": 10, "relora_prune_ratio": 0.9,
    "lisa_n_layers": 4, "lisa_step_interval": 20, "spectrum_top_fraction": 0.5, "kd_alpha": 0.9, "kd_ce_alpha": 0.1,
    "kd_temperature": 1.0, "datasets.logprobs_field": "logprobs",
    "resume_from_checkpoint": "./outputs/my-run/checkpoint-100", "lora_model_dir": "./outputs/my-run",
    "hub_model_id": "me/my-model", "wandb_project": "ftkit", "wandb_mode": "offline",
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "type.field_instruction": "question", "type.field_output": "answer", "type.field_input": "context",
    "type.format": "[INST] {instruction} [/INST]", "type.no_input_format": "[INST] {instruction} [/INST]",
    "type.system_format": "{system}\n", "type.prompt_format": "{prompt}", "type.chosen_format": "{chosen}",
    "type.rejected_format": "{rejected}", "type.completion_format": "{completion}",
}

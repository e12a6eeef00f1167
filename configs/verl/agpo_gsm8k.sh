#!/usr/bin/env bash
# AGPO in verl (>= 0.5, with vLLM rollouts and FSDP): verl's PPO trainer with algorithm.adv_estimator=agpo,
# registered by agpo_lab.integrations.verl inside the TaskRunner actor that computes advantages.
#
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct LORA_RANK=16 bash configs/verl/agpo_gsm8k.sh      # LoRA
#   MODEL=Qwen/Qwen2.5-1.5B-Instruct LORA_RANK=0  N_GPUS=4 bash configs/verl/agpo_gsm8k.sh   # full
#
# Data: verl's parquet files (python examples/data_preprocess/gsm8k.py --local_dir ~/data/gsm8k in a
# verl checkout); verl's GSM8K rule reward gives 1.0 / 0.0, hence agpo.r_min=0, agpo.r_max=1.
# MATH-500 after training: merge the FSDP checkpoint to a Hugging Face folder
# (python -m verl.model_merger merge --backend fsdp --local_dir <ckpt>/actor --target_dir <hf_dir>),
# then: agpo-lab eval <hf_dir> --task math500 eval.max_new_tokens=512
# Memory per GPU: docs/scaling.md ("Memory per GPU"), plus vLLM's gpu_memory_utilization share.
# Extra arguments are passed on as Hydra overrides (e.g. trainer.total_training_steps=5).
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
LORA_RANK=${LORA_RANK:-16}
N_GPUS=${N_GPUS:-1}
DATA=${DATA:-$HOME/data/gsm8k}
if [ "$LORA_RANK" -gt 0 ]; then LR=1e-5; else LR=1e-6; fi

python -m agpo_lab.integrations.verl \
  algorithm.adv_estimator=agpo \
  algorithm.use_kl_in_reward=false \
  +agpo.r_min=0.0 +agpo.r_max=1.0 +agpo.length_weight=0.1 +agpo.length_in_homogeneous_groups=false \
  data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
  data.train_batch_size=32 data.max_prompt_length=256 data.max_response_length=512 \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.model.lora_rank="$LORA_RANK" actor_rollout_ref.model.lora_alpha=32 \
  actor_rollout_ref.model.target_modules=all-linear \
  actor_rollout_ref.model.enable_gradient_checkpointing=true \
  actor_rollout_ref.actor.optim.lr="$LR" \
  actor_rollout_ref.actor.ppo_mini_batch_size=8 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
  actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.28 \
  actor_rollout_ref.actor.use_kl_loss=true actor_rollout_ref.actor.kl_loss_coef=0.04 \
  actor_rollout_ref.actor.kl_loss_type=low_var_kl \
  actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean \
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.4 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16 \
  trainer.n_gpus_per_node="$N_GPUS" trainer.nnodes=1 \
  trainer.total_training_steps=200 trainer.save_freq=25 trainer.test_freq=50 \
  trainer.logger='[console]' trainer.project_name=agpo_lab \
  trainer.experiment_name="agpo-$(basename "$MODEL")-lora$LORA_RANK" \
  "$@"

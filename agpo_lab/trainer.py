"""The RL loop: sample prompts -> G completions each -> rewards -> advantages -> clipped updates.

Read `Trainer.train` and `Trainer.train_step` top to bottom. One step:

    1. draw prompts_per_step prompts (this process takes its share; groups are never split)
    2. sample G completions per prompt with the current policy (their log-probs are the "old" ones)
    3. reward = task score + length shaping, computed on whole groups
    4. advantages per group (GRPO, AGPO, ...); zero_variance=drop masks homogeneous groups and can
       resample replacements (DAPO dynamic sampling, at most algorithm.max_resample_rounds rounds)
    5. mu inner epochs over mini-batches: clipped surrogate (+ beta * KL), gradient accumulation
       over length-sorted micro-batches (rows whose loss is exactly 0 are skipped), gradient
       clipping, AdamW with linear warm-up
    6. metrics (flushed to metrics.jsonl), periodic evaluation, samples and checkpoints

Every random choice comes from explicit `torch.Generator`s whose states are checkpointed, so a
resumed run reproduces an uninterrupted one bit for bit on CPU. Mechanics live in `checkpointing`
(checkpoints, resume, Ctrl-C), `distributed` (processes), `metrics` and `rewards`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.nn.utils import clip_grad_norm_
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from agpo_lab import checkpointing
from agpo_lab import distributed as dist
from agpo_lab.config import TrainConfig
from agpo_lab.metrics import RatioGuard, UpdateStats, rollout_metrics, sample_records
from agpo_lab.models.loading import load_policy, load_reference
from agpo_lab.rewards import group_advantages, shaped_rewards
from agpo_lab.rollout import completion_logprobs, generate
from agpo_lab.runs import RunDir
from agpo_lab.tasks.registry import build_task
from agpo_lab.trainer_utils import (
    RowBatch,
    configured_loss,
    disable_dropout,
    linear_warmup,
    micro_batches,
    reference_logprobs,
)

Callback = Callable[[int, dict[str, Any]], Any]


class Trainer:
    """GRPO / AGPO / relatives on any causal LM. ``Trainer(cfg).train(callback=...)``.

    The constructor loads the task, model, reference and optimizer and opens the run directory
    (resuming from its last checkpoint when run.resume is set). `model`, `tokenizer` and `task`
    can be passed in directly (notebooks, tests); otherwise they are built from the config.
    """

    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None, task=None) -> None:
        self.cfg = cfg = config.validate()
        self.accelerator, self.rank, self.world, self.device = dist.processes(cfg.run.device)
        if cfg.run.prompts_per_step % self.world:
            raise ValueError(
                f"run.prompts_per_step must be divisible by the {self.world} processes"
            )
        torch.manual_seed(cfg.run.seed)  # model-side randomness (e.g. LoRA init) only
        self.task = task or build_task(cfg.task)
        self.problems = self.task.problems(cfg.task.train_split)
        if model is None:
            model, tokenizer = load_policy(cfg.model, self.device)
        self.policy, self.tokenizer = model.to(self.device), tokenizer
        disable_dropout(self.policy)  # so that the first-epoch ratio is exactly 1
        beta = cfg.algorithm.beta  # without a KL term no reference model is kept
        self.reference = load_reference(self.policy, cfg.model, beta) if beta > 0 else None
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, linear_warmup(o.warmup_steps))
        self.model = self.policy  # what the loss calls: the DDP wrapper under accelerate
        if self.accelerator:
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        # what the update's forward calls; shares the parameters (state dict keys stay plain)
        self.update_model = (
            torch.compile(self.model, dynamic=True) if o.compile_update else self.model
        )
        seed = cfg.run.seed  # prompt order is shared by all processes, sampling is per process
        self.data_generator = torch.Generator().manual_seed(seed)
        self.sample_generator = torch.Generator(self.device).manual_seed(
            seed * 1000 + 1 + self.rank
        )
        self.step, self.stop_requested = 0, False
        self._mid_update, self._ratio_guard = False, RatioGuard()  # the guard warns once per run
        self.run_dir = RunDir(checkpointing.run_path(cfg, self.accelerator))
        checkpointing.open_run_dir(self)

    # ---- the loop --------------------------------------------------------------------------

    def train(self, callback: Callback | None = None) -> list[dict[str, Any]]:
        """Run until run.steps; returns this call's per-step metrics.

        `callback(step, metrics)` runs after each step; returning True stops after that step.
        Ctrl-C stops after the current step and saves (press twice to stop at once; the
        checkpoint is then kept only if the weights were not half-updated).
        """
        cfg, logged, rng_at_step_start = self.cfg.run, [], None
        if cfg.eval_at_start and self.step == 0 and cfg.eval_every:
            self._log({"step": 0, **self.evaluate()})
        with checkpointing.deferred_interrupt(self):
            try:
                while self.step < cfg.steps and not self.stop_requested:
                    rng_at_step_start = checkpointing.rng_state(self)
                    step = self.step + 1
                    metrics = {"step": step, **self.train_step()}
                    if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                        metrics.update(self.evaluate())
                    self._log(metrics)
                    self.step += 1
                    rng_at_step_start, self._mid_update = None, False
                    logged.append(metrics)
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save_checkpoint()
                    if callback is not None and callback(self.step, metrics) is True:
                        break
            except KeyboardInterrupt:
                checkpointing.save_after_hard_interrupt(
                    self, mid_update=self._mid_update, rng_at_step_start=rng_at_step_start
                )
                return logged
        self.save_checkpoint()
        if self.step >= cfg.steps:
            self.export_policy()
        return logged

    def train_step(self) -> dict[str, Any]:
        """One RL step (rollout, rewards, advantages, update); returns its metrics."""
        t0, extra_tokens = time.perf_counter(), 0
        G, k = self.cfg.rollout.group_size, self.cfg.run.prompts_per_step // self.world
        shared = torch.randperm(len(self.problems), generator=self.data_generator)
        picks = shared.repeat(-(-self.cfg.run.prompts_per_step // len(self.problems)))
        problems = [self.problems[i] for i in picks[self.rank * k : (self.rank + 1) * k].tolist()]
        batch, info = self._rollout(problems)
        scored = [info[key] for key in ("scores", "rewards", "lengths", "truncated")]
        advantages, active = batch.advantages.view(-1, G).cpu(), batch.active.view(-1, G)[:, 0]
        metrics = rollout_metrics(*dist.gather(self.accelerator, *scored, advantages, active.cpu()))
        entropy, tokens = (
            dist.reduce_sum(self.accelerator, info[k]) for k in ("entropy_sum", "tokens")
        )
        metrics["policy/entropy"] = entropy / max(tokens, 1)  # of the sampling distribution
        if self.cfg.algorithm.zero_variance == "drop":
            batch, dynamic, extra_tokens = self._replace_dropped_groups(batch)
            metrics.update(dynamic)
        t1 = time.perf_counter()
        metrics.update(self._update(batch))
        every, n = self.cfg.run.log_samples_every, self.cfg.run.num_samples
        if self.rank == 0 and every and (self.step + 1) % every == 0:
            samples = sample_records(self.step + 1, problems, info, batch.advantages, G, n)
            self.run_dir.log_samples(samples)
        seconds = time.perf_counter() - t0
        tokens = dist.reduce_sum(self.accelerator, info["tokens"] + extra_tokens)
        metrics.update(
            {
                "optim/lr": self.scheduler.get_last_lr()[0],
                "perf/step_seconds": seconds,
                "perf/rollout_seconds": t1 - t0,
                "perf/tokens_per_s": tokens / max(t1 - t0, 1e-9),
            }
        )
        return metrics

    # ---- rollout, rewards, advantages -------------------------------------------------------

    def _rollout(self, problems: list) -> tuple[RowBatch, dict[str, Any]]:
        """G completions per problem, scored on whole groups, with advantages."""
        G, a = self.cfg.rollout.group_size, self.cfg.algorithm
        prompts = [self.task.format_prompt(p, self.tokenizer) for p in problems for _ in range(G)]
        model = dist.unwrap(self.model, self.accelerator)
        out = generate(
            model, self.tokenizer, prompts, self.cfg.rollout, generator=self.sample_generator
        )
        scores = torch.tensor(
            [self.task.score(text, problems[i // G]) for i, text in enumerate(out.texts)]
        ).view(-1, G)
        lengths, truncated = out.lengths.cpu().view(-1, G), out.truncated.cpu().view(-1, G)
        rewards = shaped_rewards(scores, lengths, a, self.cfg.rollout.max_new_tokens)
        advantages, group_mask = group_advantages(rewards, a)
        batch = RowBatch(
            prompt_ids=out.prompt_ids,
            prompt_mask=out.prompt_mask,
            completion_ids=out.completion_ids,
            completion_mask=out.completion_mask,
            old_logprobs=out.logprobs,
            advantages=advantages.flatten().to(self.device),
            active=group_mask.repeat_interleave(G).to(self.device),
        )
        info = {"scores": scores, "rewards": rewards, "lengths": lengths, "truncated": truncated}
        tokens, entropy = int(out.lengths.sum()), out.entropy.sum().item()
        return batch, {**info, "texts": out.texts, "tokens": tokens, "entropy_sum": entropy}

    def _replace_dropped_groups(self, batch: RowBatch) -> tuple[RowBatch, dict[str, float], int]:
        """DAPO dynamic sampling: swap dropped groups for freshly sampled informative ones.
        Returns the batch, dynamic/* metrics and the number of extra tokens generated."""
        G, rounds, extra_tokens = self.cfg.rollout.group_size, 0, 0
        while rounds < self.cfg.algorithm.max_resample_rounds:
            dropped = (~batch.active.view(-1, G)[:, 0]).nonzero().flatten().tolist()
            if not dropped:
                break
            rounds += 1
            # Per-process generator: the shared data generator must stay in step on all ranks.
            n, gen = len(self.problems), self.sample_generator
            picks = torch.randint(n, (len(dropped),), generator=gen, device=self.device)
            extra, info = self._rollout([self.problems[i] for i in picks.tolist()])
            extra_tokens += info["tokens"]
            fresh = extra.active.view(-1, G)[:, 0].nonzero().flatten().tolist()
            tok = self.tokenizer
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            batch = batch.replace_groups(dropped, extra, fresh, G, pad_id)
        active_groups = batch.active.view(-1, G)[:, 0].float().mean()
        dynamic = {
            "dynamic/resample_rounds": dist.reduce_mean(self.accelerator, rounds),
            "dynamic/active_frac": dist.reduce_mean(self.accelerator, active_groups.item()),
        }
        return batch, dynamic, extra_tokens

    # ---- the update ------------------------------------------------------------------------

    def _update(self, batch: RowBatch) -> dict[str, Any]:
        """mu epochs of mini-batch AdamW steps on the clipped surrogate (+ beta * KL)."""
        a, o, acc = self.cfg.algorithm, self.cfg.optim, self.accelerator
        rows, T = batch.advantages.numel(), self.cfg.rollout.temperature
        mini = (o.mini_batch_size or rows * self.world) // self.world
        lengths, by_token = batch.row_lengths(), a.aggregation == "token_mean"
        split = partial(micro_batches, prompt_lengths=lengths[0], completion_lengths=lengths[1])
        # a row's weight in its mini-batch loss: its tokens (token_mean) or 1 (active rows)
        row_weight = batch.loss_mask.sum(1) if by_token else batch.active.float()
        # Rows whose loss is exactly 0 (dropped groups; zero advantage without a KL term) are left
        # out of the forward and backward, their weight still counts. One process only: under DDP
        # every process must run the same backward passes.
        computed = batch.active & ((batch.advantages != 0) | (a.beta > 0))
        computed = computed | (acc is not None)
        all_rows = torch.arange(rows, device=self.device)
        chunks = split(all_rows, count=o.grad_accumulation, token_budget=o.micro_batch_tokens)
        ref = reference_logprobs(self.reference, batch, chunks, temperature=T)
        stats = UpdateStats(self._ratio_guard)
        loss_fn = configured_loss(a, max_len=self.cfg.rollout.max_new_tokens)
        self.model.train()
        for epoch in range(a.mu):
            order = torch.arange(rows)
            if rows > mini:  # shuffle whole rows across mini-batches (same draw on every rank)
                order = torch.randperm(rows, generator=self.data_generator)
            for start in range(0, rows, mini):
                idx = order[start : start + mini].to(self.device)
                total = row_weight[idx].sum()
                if dist.reduce_sum(acc, total.item()) == 0:
                    continue  # only dropped groups: no gradient, and no Adam momentum step either
                chunks = split(idx[computed[idx]], count=o.grad_accumulation,
                               token_budget=o.micro_batch_tokens)  # fmt: skip
                if acc and o.micro_batch_tokens:  # as many backward passes on every process
                    chunks = split(idx, count=int(dist.reduce_max(acc, len(chunks))))
                total, step_stats = total.clamp(min=1e-9), {}
                for i, chunk in enumerate(chunks):
                    mb = batch.select(chunk).trimmed()
                    with dist.sync_gradients_if(i == len(chunks) - 1, acc, self.model):
                        logps = completion_logprobs(
                            self.update_model, *mb.model_inputs, temperature=T
                        )
                        mb_ref = None if ref is None else ref[chunk, : logps.shape[1]]
                        loss, diag = loss_fn(
                            logps, mb.old_logprobs, mb.advantages, mb.loss_mask, mb_ref
                        )
                        # the mini-batch loss is the weighted mean over its micro-batches
                        share = (row_weight[chunk].sum() / total).item()
                        dist.backward(acc, loss * share)
                    for key, value in diag.items():  # UpdateStats.summary picks what it reports
                        step_stats[key] = step_stats.get(key, 0.0) + share * value
                    if epoch == 0:  # before any optimizer step, the ratio guard
                        stats.observe_first_epoch(logps, mb, before_any_step=start == 0)
                if not chunks:  # every row's gradient is exactly 0; Adam still takes its step
                    for p in self.params:
                        p.grad = torch.zeros_like(p)
                max_norm = o.max_grad_norm or float("inf")
                step_stats["grad_norm"] = clip_grad_norm_(self.params, max_norm).item()
                self._mid_update = True  # from here on the weights differ from the step's start
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                stats.add(step_stats)
        return {
            k: (v if v is None else dist.reduce_mean(acc, v)) for k, v in stats.summary().items()
        }

    # ---- evaluation, logging, checkpoints ---------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """eval/* metrics on the held-out split (process 0 evaluates; same seed each time)."""
        from agpo_lab.evaluation import evaluate

        if self.rank != 0:
            return {}
        problems = self.task.problems(self.cfg.task.eval_split)
        gen = torch.Generator(self.device).manual_seed(self.cfg.eval.seed)
        model = dist.unwrap(self.model, self.accelerator)
        return evaluate(model, self.tokenizer, self.task, problems, self.cfg.eval, generator=gen)

    def save_checkpoint(self) -> None:
        """Write checkpoints/step_N.safetensors (trainable weights, optimizer, scheduler, RNG)."""
        checkpointing.save(self)

    def load_checkpoint(self, path) -> None:
        """Restore weights, optimizer, scheduler and every RNG from a checkpoint file."""
        checkpointing.load(self, path)

    def export_policy(self) -> None:
        """Save the trained policy (LoRA merged into a copy) and tokenizer to run_dir/final."""
        if self.rank == 0:
            model = dist.unwrap(self.model, self.accelerator)
            checkpointing.export_policy(model, self.tokenizer, self.run_dir.final_dir)

    def _log(self, metrics: dict[str, Any]) -> None:
        if self.rank == 0:
            self.run_dir.log_metrics(metrics)

"""The RL loop: sample prompts -> G completions each -> rewards -> advantages -> clipped updates.

Read `Trainer.train`, `Trainer.train_step` and `Trainer._update` top to bottom. One step:

    1. draw prompts_per_step prompts (this process takes its share; groups are never split)
    2. sample G completions per prompt with the current policy (their log-probs are the "old" ones)
    3. reward = task score + length shaping, computed on whole groups
    4. advantages per group (GRPO, AGPO, ...); zero_variance=drop masks homogeneous groups and can
       resample replacements (DAPO dynamic sampling, at most algorithm.max_resample_rounds rounds);
       zero_variance=rl_zvp gives them entropy-guided token advantages (RL-ZVP)
    5. the update, as `planning.plan_update` lays it out: mu epochs of mini-batch AdamW steps on the
       clipped surrogate (+ beta * KL), each the sum of length-sorted micro-batch passes over the
       rows that carry a gradient (a group's rows share one forward of their prompt);
       gradient clipping; linear warm-up
    6. metrics (flushed to metrics.jsonl), periodic evaluation, samples and checkpoints

Every random choice comes from explicit `torch.Generator`s that a checkpoint saves with the weights
and optimizer (`checkpoints.TrainingState`), so a resumed run reproduces an uninterrupted one bit
for bit on CPU.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn.utils import clip_grad_norm_
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from agpo_lab.algorithms.loss import loss_rows, policy_loss
from agpo_lab.algorithms.sampler_correction import mismatch_metrics, sampler_weights
from agpo_lab.config import TrainConfig
from agpo_lab.errors import ConfigError, NonFiniteError
from agpo_lab.evaluation import evaluate
from agpo_lab.models.loading import disable_dropout, load_policy
from agpo_lab.rollout import completion_logprobs, generate
from agpo_lab.rollout.inputs import distinct_prompts
from agpo_lab.rollout.logprobs import (
    can_pack_rows,
    can_share_prompts,
    lm_head_share,
    pass_layout,
)
from agpo_lab.rollout.precision import autocast_to, lower_dtype
from agpo_lab.tasks.base import Problem, Task
from agpo_lab.tasks.registry import build_task
from agpo_lab.training import faults
from agpo_lab.training.batch import RowBatch
from agpo_lab.training.bounds import check_run_bounds, sampling_seed
from agpo_lab.training.checkpoints import (
    TrainingState,
    export_policy,
    find_latest_checkpoint,
    load_checkpoint,
    load_latest_good_checkpoint,
)
from agpo_lab.training.distributed import Processes
from agpo_lab.training.interrupts import StopRequest
from agpo_lab.training.lowered_weights import LoweredFrozenWeights
from agpo_lab.training.metrics import (
    RatioGuard,
    UpdateStats,
    branch_metrics,
    rollout_metrics,
    sample_records,
    stop_probability,
)
from agpo_lab.training.planning import UpdatePlan, plan_update
from agpo_lab.training.precision import lost_update_warning
from agpo_lab.training.reference import ReferencePolicy, load_reference, reference_logprobs
from agpo_lab.training.rewards import group_advantages, shaped_rewards, token_advantages
from agpo_lab.training.run_dir import RunDir
from agpo_lab.training.tracking import Trackers, check_trackers

Callback = Callable[[int, dict[str, Any]], Any]


def linear_warmup(warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier after s optimizer steps: min(1, (s + 1) / warmup_steps), or 1
    without warm-up (for `torch.optim.lr_scheduler.LambdaLR`).

    Example: linear_warmup(4) gives 0.25, 0.5, 0.75, 1.0, 1.0, ... for s = 0, 1, 2, ...
    """
    return lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0


def _computed_tokens(
    batch: RowBatch, plan: UpdatePlan, share: bool, pack: bool, head_share: float = 0.0
) -> tuple[int, int]:
    """(real, padded) tokens that the update's forward/backward passes went through, summed over
    its epochs: prompt + completion tokens without padding (a pass that shares prompts computes
    each distinct prompt once), and the tokens its layout computes with padding
    (`logprobs.pass_layout`). Rows whose gradient is exactly 0 are never computed."""
    real = padded = 0
    for micro in (m for step in plan.steps for m in step.micro_batches):
        prompt_ids, prompt_mask, _, completion_mask = batch.select(micro.rows).model_inputs
        prompts, completions = prompt_mask.sum(1).tolist(), completion_mask.sum(1).long().tolist()
        groups = distinct_prompts(prompt_ids, prompt_mask)[2].tolist() if share else None
        layout, tokens, _ = pass_layout(prompts, completions, groups, pack, head_share)
        if layout == "shared":
            prompt_mask = distinct_prompts(prompt_ids, prompt_mask)[1]
        real += int(prompt_mask.sum() + completion_mask.sum())
        padded += tokens
    return real, padded


class Trainer:
    """GRPO / AGPO / relatives on any causal LM. ``Trainer(cfg).train(callback=...)``.

    The constructor loads the task, the policy, its reference and optimizer and opens the run
    directory (resuming from its last checkpoint when run.resume is set). `model`, `tokenizer` and
    `task` can be passed in directly (notebooks, tests); otherwise they are built from the config.
    `policy` is the network being trained: what samples, what is evaluated and saved.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        task: Task | None = None,
    ) -> None:
        self.cfg = cfg = config.validate()
        self.processes = procs = Processes(cfg.run.device)
        if cfg.run.prompts_per_step % procs.world:
            raise ConfigError(
                f"run.prompts_per_step={cfg.run.prompts_per_step}: must be divisible by the "
                f"{procs.world} processes"
            )
        # What the machine and the model allow (memory, task size, seeds), from config.json only;
        # then the run directory: a locked, unwritable or corrupt one fails before any model loads.
        check_run_bounds(cfg, procs.device, procs.world, getattr(model, "config", None))
        check_trackers(cfg.run.report_to)  # a missing tracker package fails before any work
        self.run_dir = RunDir(self._run_path())
        resume_from = self._open_run_dir()
        self._trackers: Trackers | None = None
        try:
            step, saved_rows = 0, {}
            if resume_from is not None:
                step, saved_rows = int(resume_from[2]["step"]), resume_from[2].get("logs") or {}
            if procs.rank == 0:  # the steps after the checkpoint run again: their rows go
                self.run_dir.roll_back(step if step else -1)  # at 0 the start eval reruns too
                if step:  # a row of the checkpointed step lost to a torn write comes back
                    self.run_dir.restore_rows(step, saved_rows)
            self._build(model, tokenizer, task)
            # The rows the last completed step logged (its checkpoint keeps them) and the rows
            # of the step under way.
            self._step_rows: dict[str, list[dict[str, Any]]] = dict(saved_rows)
            self._pending_rows: dict[str, list[dict[str, Any]]] = {}
            if resume_from is not None:
                self.state.restore(*resume_from[1:], procs.rank, procs.world, resume_from[0])
            if procs.rank == 0:
                self.run_dir.write_config(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        except BaseException:
            self.close()
            raise

    def _build(self, model: torch.nn.Module | None, tokenizer: Any, task: Task | None) -> None:
        """Task, policy, reference, optimizer and the training state, as the config says."""
        cfg, procs = self.cfg, self.processes
        torch.manual_seed(cfg.run.seed)  # model-side randomness (e.g. LoRA init) only
        self.task = task or build_task(cfg.task)
        self.problems = self.task.problems(cfg.task.train_split)
        if model is None:
            model, tokenizer = load_policy(cfg.model, procs.device)
        self.policy, self.tokenizer = model.to(procs.device), tokenizer
        disable_dropout(self.policy)  # so that the first-epoch ratio is exactly 1
        beta = cfg.algorithm.beta  # without a KL term no reference model is kept
        self.reference = load_reference(self.policy, cfg.model, beta) if beta > 0 else None
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        o = cfg.optim
        lost_updates = lost_update_warning(self.params, o.lr)
        if lost_updates is not None and procs.rank == 0:
            print(lost_updates, file=sys.stderr)
        optimizer = AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        scheduler = LambdaLR(optimizer, linear_warmup(o.warmup_steps))
        # The update runs through the DDP wrapper under accelerate (same parameters as `policy`),
        # compiled with optim.compile_update; everything else uses `policy` itself.
        self._ddp_policy, optimizer = procs.prepare(self.policy, optimizer)
        self._update_forward = (
            torch.compile(self._ddp_policy, dynamic=True) if o.compile_update else self._ddp_policy
        )
        # One forward per distinct prompt needs the plain module: not through DDP or the compiler.
        share = o.share_prompts and not procs.distributed and not o.compile_update
        self._share_prompts = share and can_share_prompts(self.policy.train())
        self._pack_rows = o.pack_rows and can_pack_rows(self.policy)
        self._head_share = lm_head_share(self.policy)  # weighs the passes' layouts
        # bfloat16 autocast of the update's passes (optim.precision), and whether the rollout's
        # log-probs come from another computation than the update's (then corrected for).
        self._update_dtype = lower_dtype(self.policy, o.precision)
        # cast once, not per pass (and with lowered_activations, the residual stream in bfloat16)
        self._lowered_weights = LoweredFrozenWeights(self._update_dtype, o.lowered_activations)
        if self.reference is not None and not cfg.model.lora:  # a frozen copy, run only lowered
            self._lowered_weights.lower_for_good(self.reference.model)
        rollout_lowered = lower_dtype(self.policy, cfg.rollout.precision) is not None
        self._sampler_differs = rollout_lowered or self._update_dtype is not None
        seed = cfg.run.seed  # prompt order is shared by all processes, sampling is per process
        self.state = TrainingState(
            policy=self.policy,
            optimizer=optimizer,
            scheduler=scheduler,
            data_generator=torch.Generator().manual_seed(seed),
            sample_generator=torch.Generator(procs.device).manual_seed(
                sampling_seed(seed, procs.rank)
            ),
        )
        self.stop = StopRequest()
        self._mid_update, self._ratio_guard = False, RatioGuard()  # the guard warns once per run

    @property
    def step(self) -> int:
        """RL steps completed."""
        return self.state.step

    # ---- the loop --------------------------------------------------------------------------

    def train(self, callback: Callback | None = None) -> list[dict[str, Any]]:
        """Run until run.steps; returns this call's per-step metrics.

        `callback(step, metrics)` runs after each step; returning True stops after that step.
        Ctrl-C or SIGTERM stops after the current step and saves (a second one stops at once; the
        checkpoint is then kept only if the weights were not half-updated). status.json says
        running, then finished, interrupted (resumable) or failed.
        """
        run, logged, rng_at_step_start = self.cfg.run, [], None
        self.interrupted = False  # set when a stop request ends this call before run.steps
        self._set_status("running")
        if run.report_to and self.processes.rank == 0:
            self._trackers = Trackers(
                run.report_to, self.run_dir.path, run.name, self.cfg.to_dict()
            )
        try:
            with self.stop.catching_signals():
                try:
                    droppable = not self.processes.distributed  # see StopRequest.immediate
                    if run.eval_at_start and self.step == 0 and run.eval_every:
                        self.stop.immediate = droppable  # nothing to lose: stop at once
                        self._log({"step": 0, **self.evaluate()})
                        self.stop.immediate = False
                    while self.step < run.steps and not self.stop.requested:
                        faults.point("step.start")
                        rng_at_step_start, self._pending_rows = self.state.rng_state(), {}
                        step = self.step + 1
                        # until the update moves the weights (_update clears it), a stop drops
                        # the step: the RNG is rewound and the last checkpoint stays the latest
                        self.stop.immediate = droppable
                        metrics = {"step": step, **self.train_step()}
                        self.stop.immediate = False
                        if run.eval_every and (step % run.eval_every == 0 or step == run.steps):
                            metrics.update(self._evaluate_unless_stopped())
                        self._log(metrics)
                        self.state.step += 1  # its rows go into its checkpoint
                        self._step_rows, self._pending_rows = self._pending_rows, {}
                        rng_at_step_start, self._mid_update = None, False
                        logged.append(metrics)
                        if run.save_every and self.step % run.save_every == 0:
                            self.save_checkpoint()
                        if callback is not None and callback(self.step, metrics) is True:
                            break
                except KeyboardInterrupt:
                    self._save_after_hard_interrupt(rng_at_step_start)
                    self.interrupted = True
                    self._set_status("interrupted")
                    return logged
                self.save_checkpoint()  # still listening: a stop request cannot cut these short
                if self.step >= run.steps:
                    self.export_policy()
                    self._set_status("finished")
                else:
                    self.interrupted = True
                    self._set_status("interrupted")
        except BaseException as err:
            with contextlib.suppress(Exception):
                self._set_status("failed", f"{type(err).__name__}: {err}")
            raise
        finally:
            self.stop.immediate = False  # (a KeyboardInterrupt may have left it set)
            if self._trackers is not None:
                self._trackers.finish()
                self._trackers = None
            self.close()
        return logged

    def close(self) -> None:
        """Release the run directory (its lock); `train` takes it again when called."""
        self.run_dir.close()

    def train_step(self) -> dict[str, Any]:
        """One RL step (rollout, rewards, advantages, update); returns its metrics."""
        t0, extra_tokens, extra_rows, procs = time.perf_counter(), 0, 0, self.processes
        G, per_process = self.cfg.rollout.group_size, self.cfg.run.prompts_per_step // procs.world
        shared = torch.randperm(len(self.problems), generator=self.state.data_generator)
        picks = shared.repeat(-(-self.cfg.run.prompts_per_step // len(self.problems)))
        mine = picks[procs.rank * per_process : (procs.rank + 1) * per_process]
        problems = [self.problems[i] for i in mine.tolist()]
        batch, info = self._rollout(problems)
        scored = [info[key] for key in ("scores", "rewards", "lengths", "truncated")]
        advantages, active = batch.advantages.view(-1, G).cpu(), batch.active.view(-1, G).any(1)
        metrics = rollout_metrics(*procs.gather(*scored, advantages, active.cpu()))
        metrics.update(
            branch_metrics(*procs.gather(info["scores"], info["lengths"], info["end_prob"]))
        )
        entropy, tokens = procs.sum(info["entropy_sum"]), procs.sum(info["tokens"])
        metrics["policy/entropy"] = entropy / max(tokens, 1)  # of the sampling distribution
        if self.cfg.algorithm.zero_variance == "drop":
            batch, dynamic, extra_tokens, extra_rows = self._replace_dropped_groups(batch)
            metrics.update(dynamic)
        t1 = time.perf_counter()
        faults.point("step.rollout")
        metrics.update(self._update(batch))
        every, n = self.cfg.run.log_samples_every, self.cfg.run.num_samples
        if procs.rank == 0 and every and (self.step + 1) % every == 0:
            samples = sample_records(self.step + 1, problems, info, batch.advantages, G, n)
            self.run_dir.log_samples(samples)
            self._pending_rows["samples.jsonl"] = samples
        seconds = time.perf_counter() - t0
        tokens = procs.sum(info["tokens"] + extra_tokens)
        metrics.update(
            {  # what sampling cost, resampled groups included: the compute to compare methods by
                "rollout/completions": procs.sum(len(problems) * G + extra_rows),
                "rollout/tokens": tokens,
                "optim/lr": self.state.scheduler.get_last_lr()[0],
                "perf/step_seconds": seconds,
                "perf/rollout_seconds": t1 - t0,
                "perf/tokens_per_s": tokens / max(t1 - t0, 1e-9),
            }
        )
        return metrics

    # ---- rollout, rewards, advantages -------------------------------------------------------

    def _rollout(self, problems: list[Problem]) -> tuple[RowBatch, dict[str, Any]]:
        """G completions per problem, scored on whole groups, with advantages."""
        G, a = self.cfg.rollout.group_size, self.cfg.algorithm
        prompts = [self.task.format_prompt(p, self.tokenizer) for p in problems for _ in range(G)]
        out = generate(
            self.policy,
            self.tokenizer,
            prompts,
            self.cfg.rollout,
            generator=self.state.sample_generator,
        )
        scores = torch.tensor(
            [self.task.score(text, problems[i // G]) for i, text in enumerate(out.texts)]
        ).view(-1, G)
        lengths, truncated = out.lengths.cpu().view(-1, G), out.truncated.cpu().view(-1, G)
        rewards = shaped_rewards(scores, lengths, a, self.cfg.rollout.max_new_tokens)
        self._check_finite("rewards", rewards)
        advantages, group_mask = group_advantages(rewards, a)
        device = self.processes.device
        row_adv, token_adv = token_advantages(
            rewards, advantages, out.entropy, out.completion_mask, a
        )
        self._check_finite("advantages", row_adv if token_adv is None else token_adv)
        batch = RowBatch(
            prompt_ids=out.prompt_ids,
            prompt_mask=out.prompt_mask,
            completion_ids=out.completion_ids,
            completion_mask=out.completion_mask,
            old_logprobs=out.logprobs,
            advantages=row_adv.to(device),
            active=loss_rows(group_mask, truncated, a.mask_truncated).to(device),
            token_advantages=None if token_adv is None else token_adv.to(device),
            sampler_logprobs=out.logprobs if self._sampler_differs else None,
        )
        end_prob = stop_probability(out.logprobs, out.lengths, out.truncated).view(-1, G)
        info = {"scores": scores, "rewards": rewards, "lengths": lengths, "truncated": truncated,
                "end_prob": end_prob}  # fmt: skip
        tokens, entropy = int(out.lengths.sum()), out.entropy.sum().item()
        return batch, {**info, "texts": out.texts, "tokens": tokens, "entropy_sum": entropy}

    def _replace_dropped_groups(
        self, batch: RowBatch
    ) -> tuple[RowBatch, dict[str, float], int, int]:
        """DAPO dynamic sampling: swap dropped groups for freshly sampled informative ones.
        Returns the batch, dynamic/* metrics and the extra tokens and completions generated."""
        G, rounds, extra_tokens, extra_rows = self.cfg.rollout.group_size, 0, 0, 0
        while rounds < self.cfg.algorithm.max_resample_rounds:
            dropped = (~batch.active.view(-1, G).any(1)).nonzero().flatten().tolist()
            if not dropped:
                break
            rounds += 1
            # Per-process generator: the shared data generator must stay in step on all ranks.
            n, gen = len(self.problems), self.state.sample_generator
            picks = torch.randint(n, (len(dropped),), generator=gen, device=self.processes.device)
            extra, info = self._rollout([self.problems[i] for i in picks.tolist()])
            extra_tokens += info["tokens"]
            extra_rows += len(dropped) * G
            fresh = extra.active.view(-1, G).any(1).nonzero().flatten().tolist()
            tok = self.tokenizer
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            batch = batch.replace_groups(dropped, extra, fresh, G, pad_id)
        active_groups = batch.active.view(-1, G).any(1).float().mean()
        dynamic = {
            "dynamic/resample_rounds": self.processes.mean(rounds),
            "dynamic/active_frac": self.processes.mean(active_groups.item()),
        }
        return batch, dynamic, extra_tokens, extra_rows

    # ---- the update ------------------------------------------------------------------------

    def _update(self, batch: RowBatch) -> dict[str, Any]:
        """mu epochs of mini-batch AdamW steps on the clipped surrogate (+ beta * KL), with the
        frozen weights in the update's precision (optim.precision) for all of its passes."""
        reference = None if self.reference is None else self.reference.model
        with self._lowered_weights.applied(self.policy, reference):
            return self._update_passes(batch)

    def _update_passes(self, batch: RowBatch) -> dict[str, Any]:
        """The update itself: its plan, the reference's log-probs, then each step's passes."""
        a, o, T = self.cfg.algorithm, self.cfg.optim, self.cfg.rollout.temperature
        procs, state = self.processes, self.state
        rows = batch.advantages.numel()
        plan = plan_update(
            batch,
            epochs=a.mu,
            mini_batch_rows=(o.mini_batch_size or rows * procs.world) // procs.world,
            grad_accumulation=o.grad_accumulation,
            token_budget=o.micro_batch_tokens,
            token_mean=a.aggregation == "token_mean",
            beta=a.beta,
            generator=state.data_generator,
            compute_all_rows=procs.distributed,
            sum_over_processes=procs.sum,
            max_over_processes=procs.max,
            share_prompts=self._share_prompts,
            pack_rows=self._pack_rows,
            head_share=self._head_share,
        )
        share, pack = self._share_prompts, self._pack_rows
        lowered = autocast_to(procs.device, self._update_dtype)
        with lowered:
            ref = reference_logprobs(self.reference, batch, plan.reference_chunks, T, share, pack)
        # A sampler in another precision: old log-probs are the trained policy's. With one
        # optimizer step they are the pass's own, detached; with more, one no-grad pass first.
        correct = batch.sampler_logprobs is not None
        old_from_pass = correct and len(plan.steps) == 1
        if correct and not old_from_pass:
            with lowered:
                batch.old_logprobs = reference_logprobs(
                    ReferencePolicy(self.policy), batch, plan.reference_chunks, T, share, pack
                )
        mismatch: list[tuple[torch.Tensor, ...]] = []
        stats = UpdateStats(self._ratio_guard)
        self.policy.train()
        for step in plan.steps:
            step_stats: dict[str, float] = {}
            for i, micro in enumerate(step.micro_batches):
                mb = batch.select(micro.rows).trimmed()
                last = i == len(step.micro_batches) - 1
                with procs.sync_gradients_if(last, self._ddp_policy):
                    with lowered:
                        logps = completion_logprobs(
                            self._update_forward,
                            *mb.model_inputs,
                            temperature=T,
                            share_prompts=share,
                            pack_rows=pack,
                        )
                    mb_ref = None if ref is None else ref[micro.rows, : logps.shape[1]]
                    if old_from_pass:
                        mb.old_logprobs = logps.detach()
                    weights = None
                    if correct:
                        weights = sampler_weights(
                            mb.old_logprobs, mb.sampler_logprobs, mb.loss_mask,
                            a.sampler_correction, a.sampler_correction_cap,
                        )  # fmt: skip
                        if step.epoch == 0:  # every computed row once
                            mask = mb.loss_mask > 0
                            mismatch.append(
                                (mb.old_logprobs[mask], mb.sampler_logprobs[mask], weights[mask])
                            )
                    loss, diagnostics = policy_loss(
                        logps,
                        mb.old_logprobs,
                        mb.loss_advantages,
                        mb.loss_mask,
                        mb_ref,
                        clip_low=a.clip_low,
                        clip_high=a.clip_high,
                        beta=a.beta,
                        kl_estimator=a.kl_estimator,
                        aggregation=a.aggregation,
                        max_len=self.cfg.rollout.max_new_tokens,
                        token_weights=weights,
                    )
                    # the mini-batch loss is the share-weighted sum of its passes' losses
                    procs.backward(loss * micro.share)
                for key, value in diagnostics.items():  # UpdateStats.summary picks the reported
                    step_stats[key] = step_stats.get(key, 0.0) + micro.share * value
                if step.first:  # the policy has not moved yet: old and new log-probs must agree
                    stats.observe_ratio(logps, mb)
            if not step.micro_batches:  # every row's gradient is exactly 0; Adam still steps
                for p in self.params:
                    p.grad = torch.zeros_like(p)
            max_norm = o.max_grad_norm or float("inf")
            step_stats["grad_norm"] = clip_grad_norm_(self.params, max_norm).item()
            if not math.isfinite(step_stats["grad_norm"]):  # a non-finite loss: never step on it
                raise self._non_finite(f"the loss's gradient norm is {step_stats['grad_norm']}")
            self.stop.immediate = False  # an update is never cut short by the first stop
            self._mid_update = True  # from here on the weights differ from the step's start
            state.optimizer.step()
            if not torch.stack([p.isfinite().all() for p in self.params]).all():
                raise self._non_finite("the weights overflowed to inf or nan")
            faults.point("update.optimizer_step")
            state.scheduler.step()
            state.optimizer.zero_grad(set_to_none=True)
            stats.add(step_stats)
        summary = {k: (v if v is None else procs.mean(v)) for k, v in stats.summary().items()}
        if correct:  # how far the sampler was from the trained policy (NaN: no row computed)
            empty = (batch.old_logprobs.new_zeros(0),) * 3
            trainer_lp, sampler_lp, weights = (torch.cat(p) for p in zip(empty, *mismatch))
            ones = torch.ones_like(trainer_lp)
            found = mismatch_metrics(trainer_lp, sampler_lp, ones, weights)
            summary.update({k: procs.mean(v) for k, v in found.items()})
        real, padded = _computed_tokens(batch, plan, share, pack, self._head_share)
        return {
            **summary,
            "perf/update_tokens": procs.sum(real),
            "perf/update_padded_tokens": procs.sum(padded),
        }

    # ---- evaluation, logging, checkpoints ---------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """eval/* metrics on the held-out split (process 0 evaluates; same seed each time)."""
        if self.processes.rank != 0:
            return {}
        problems = self.task.problems(self.cfg.task.eval_split)
        gen = torch.Generator(self.processes.device).manual_seed(self.cfg.eval.seed)
        return evaluate(
            self.policy, self.tokenizer, self.task, problems, self.cfg.eval, generator=gen
        )

    def _evaluate_unless_stopped(self) -> dict[str, float]:
        """`evaluate()` after a step, dropped ({}) when a stop request comes during it: the step
        itself is kept, logged and saved without its evaluation, and the run stops after it."""
        if self.processes.distributed:  # the others would wait for process 0 at the next step
            return self.evaluate()
        try:
            self.stop.immediate = True
            return self.evaluate()
        except KeyboardInterrupt:
            print(f"stopped the evaluation after step {self.step + 1}", file=sys.stderr)
            return {}
        finally:
            self.stop.immediate = False

    def save_checkpoint(self) -> None:
        """Write checkpoints/step_N.safetensors (trainable weights, optimizer, scheduler, RNG)."""
        samplers = self.state.sample_generator.get_state()
        procs = self.processes
        if procs.distributed:  # every process's sampler, so each resumes its own stream
            samplers = procs.accelerator.gather(samplers.to(procs.device)[None]).cpu()
        if procs.rank == 0:  # with the rows this step logged, which a resume restores if lost
            path = self.run_dir.checkpoint_path(self.step)
            self.state.save(path, self.cfg, samplers, self._step_rows)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, scheduler and every RNG from a checkpoint file."""
        self.state.load(path, self.processes.rank, self.processes.world)

    def export_policy(self) -> None:
        """Save the trained policy (LoRA merged into a copy) and tokenizer to run_dir/final."""
        if self.processes.rank == 0:
            export_policy(self.policy, self.tokenizer, self.run_dir.final_dir)

    def _log(self, metrics: dict[str, Any]) -> None:
        if self.processes.rank == 0:
            self.run_dir.log_metrics(metrics)
            self._pending_rows["metrics.jsonl"] = [dict(metrics)]
            if self._trackers is not None:
                self._trackers.log(metrics)

    def _check_finite(self, what: str, values: torch.Tensor) -> None:
        """Stop with a NonFiniteError when `values` hold a NaN or an infinity (an overflow)."""
        bad = values[~values.isfinite()]
        if bad.numel():
            raise self._non_finite(f"the {what} include {bad[0].item()}")

    def _non_finite(self, problem: str) -> NonFiniteError:
        """The one-line error of a step whose loss or weights stopped being finite numbers: it
        names the step, the setting most likely at fault and the checkpoint that is kept."""
        latest = find_latest_checkpoint(self.run_dir.path)
        kept = f"{latest.name} is kept" if latest else "no checkpoint was saved yet"
        return NonFiniteError(
            f"step {self.step + 1}: {problem} (not finite), so the run stopped "
            f"without saving this step ({kept}); most likely {suspect_setting(self.cfg)}"
        )

    def _run_path(self) -> Path:
        """out_dir/name; an unnamed run gets (and keeps in cfg) "<estimator>-seed<N>-<timestamp>"."""
        run = self.cfg.run
        if run.name is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"{self.cfg.algorithm.estimator}-seed{run.seed}-{stamp}"
            run.name = self.processes.broadcast(name)  # every process must agree on the timestamp
        return Path(run.out_dir) / run.name

    def _open_run_dir(self) -> tuple[Path, dict, dict] | None:
        """Open the run directory (lock, repair) and read the checkpoint to resume from, if any:
        (path, weights, state) of the newest one that passes its checksum, else None. Never
        overwrites an existing run silently."""
        procs, chosen = self.processes, None
        if procs.rank == 0:
            self.run_dir.open()
            if self.run_dir.holds_a_run() and not self.cfg.run.resume:
                self.run_dir.close()
                raise ConfigError(
                    f"{self.run_dir.path} already holds a run; set run.resume=true to continue it "
                    "or choose another run.name"
                )
            found = load_latest_good_checkpoint(self.run_dir.path, quarantine=True)
            chosen = None if found is None else str(found[0])
        chosen = procs.broadcast(chosen)  # every process resumes from the same checkpoint
        if chosen is None:
            return None
        if procs.rank == 0:
            return found
        return (Path(chosen), *load_checkpoint(chosen))

    def _set_status(self, state: str, message: str = "") -> None:
        if self.processes.rank == 0:
            if not self.run_dir.is_open:  # a second train() call on this Trainer
                self.run_dir.open()
            self.run_dir.set_status(state, self.step, self.cfg.run.steps, message)

    def _save_after_hard_interrupt(self, rng_at_step_start: dict | None) -> None:
        """KeyboardInterrupt mid-step: save the state after the last completed step, unless the
        weights are half-way through the step's update (the last checkpoint stays the latest)."""
        if self._mid_update:
            print(
                f"interrupted during the update of step {self.step + 1}; not saving it (the "
                "weights are half-updated); resume starts from the last checkpoint",
                file=sys.stderr,
            )
            return
        if rng_at_step_start is not None:  # undo the interrupted step's random draws
            self.state.set_rng_state(rng_at_step_start)
        self.save_checkpoint()
        print(f"interrupted: saved the checkpoint after step {self.step}", file=sys.stderr)


def suspect_setting(cfg: TrainConfig) -> str:
    """The float setting of rollout, algorithm and optim furthest from its default (by orders of
    magnitude; from 1 when the default is 0) as "key=value (default d): bring it closer", or
    optim.lr when none is 10x off: the usual cause of a loss or weights that overflow."""
    defaults, worst, text = TrainConfig(), 1.0, f"optim.lr={cfg.optim.lr:g} is too high: lower it"
    for section in ("rollout", "algorithm", "optim"):
        for name, value in vars(getattr(cfg, section)).items():
            default = getattr(getattr(defaults, section), name)
            if not isinstance(value, float) or not value:
                continue
            off = abs(math.log10(abs(value) / abs(default or 1.0)))  # a default 0: vs 1
            if off > worst:
                worst = off
                text = f"{section}.{name}={value:g} (default {default:g}): bring it closer"
    return text

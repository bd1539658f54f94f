"""GCG for ``eval --tasks jailbreak`` (Zou et al. 2023, "Universal and Transferable Adversarial Attacks on Aligned
Language Models", Algorithm 1, one prompt); own code, not nanogcg (why: docs/eval.md). Each iteration:
:func:`token_gradients`, :func:`sample_candidates`, :func:`keep_retokenizable`, :func:`target_losses`."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llamafactory_hera.evaluation.gcg_budget import Budget, algorithm_source
from llamafactory_hera.runtime.run_record import write_record

CHUNK = 64  # candidates per forward pass (halved on out-of-memory)


@dataclass(frozen=True)
class Problem:
    """1-D long ids: template up to the prompt's end, template tail after the user content, target answer start."""

    before: torch.Tensor
    after: torch.Tensor
    target: torch.Tensor


@dataclass(frozen=True)
class Suffix:
    ids: tuple[int, ...]
    text: str
    loss: float
    initial_loss: float
    losses: tuple[float, ...]


def allowed_tokens(tokenizer: Any, vocab_rows: int) -> torch.Tensor:
    """``[vocab_rows]`` bool: printable non-blank ASCII ids, not special, not added (chat control tokens are added
    tokens, not always in ``all_special_ids``)."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    allowed = torch.zeros(vocab_rows, dtype=torch.bool)
    for index in range(min(vocab_rows, len(tokenizer))):
        text = tokenizer.decode([index])
        allowed[index] = index not in special and text.isascii() and text.isprintable() and bool(text.strip())
    return allowed


def _embedding_scale(embedding: Any) -> Any:
    scale = getattr(embedding, "embed_scale", None)
    return 1.0 if scale is None else scale.to(embedding.weight.dtype) if torch.is_tensor(scale) else scale


def _target_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[b, m, V]`` predicting ``target`` ``[m]`` -> mean NLL per row ``[b]``. Callers keep only the last
    ``m + 1`` positions' logits: all of 64 candidates at a 128k vocabulary take gigabytes."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -log_probs.gather(2, target.expand(logits.shape[0], -1).unsqueeze(2)).squeeze(2).mean(1)


def token_gradients(model: Any, problem: Problem, suffix: torch.Tensor) -> torch.Tensor:
    """Algorithm 1's ``∇_{e_{x_i}} L(x)``, ``[n, V]``, w.r.t. the one-hot tokens of ``suffix`` ``[n]``."""
    embedding = model.get_input_embeddings()
    weight = embedding.weight
    one_hot = torch.zeros(len(suffix), weight.shape[0], dtype=weight.dtype, device=weight.device)
    one_hot.scatter_(1, suffix.to(weight.device).unsqueeze(1), 1.0)
    one_hot.requires_grad_(True)
    with torch.enable_grad():
        embeds = torch.cat(
            [
                embedding(problem.before),
                (one_hot @ weight) * _embedding_scale(embedding),
                embedding(problem.after),
                embedding(problem.target),
            ]
        )
        logits = model(
            inputs_embeds=embeds.unsqueeze(0), logits_to_keep=len(problem.target) + 1, use_cache=False
        ).logits
        loss = _target_loss(logits[:, :-1], problem.target)[0]
        (grad,) = torch.autograd.grad(loss, one_hot)
    return grad


def sample_candidates(
    suffix: torch.Tensor, grad: torch.Tensor, top_k: int, width: int, allowed: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``[width, n]`` candidates: position ``i ~ U(suffix)`` set to an allowed token ``~ U(top-k of -grad[i])``."""
    scores = -grad.float().cpu()
    scores[:, ~allowed[: scores.shape[1]]] = float("-inf")
    top = scores.topk(min(top_k, int(allowed.sum())), dim=1).indices  # [n, k]
    positions = torch.randint(0, len(suffix), (width,), generator=generator)
    choices = torch.randint(0, top.shape[1], (width,), generator=generator)
    candidates = suffix.cpu().repeat(width, 1)
    candidates[torch.arange(width), positions] = top[positions, choices]
    return candidates


def keep_retokenizable(tokenizer: Any, candidates: torch.Tensor) -> torch.Tensor:
    keep = [tokenizer.encode(tokenizer.decode(row), add_special_tokens=False) == row.tolist() for row in candidates]
    return candidates[torch.tensor(keep, dtype=torch.bool)]


def target_losses(
    model: Any, problem: Problem, candidates: torch.Tensor, chunk: int = CHUNK
) -> tuple[torch.Tensor, int]:
    """Target losses ``[B]`` (float32, CPU) in passes of ``chunk`` rows, and the chunk that fitted."""
    device = problem.before.device
    width = len(candidates)

    def ids(rows: torch.Tensor) -> torch.Tensor:
        parts = (problem.before, rows.to(device), problem.after, problem.target)
        return torch.cat([part.expand(len(rows), -1) if part.dim() == 1 else part for part in parts], dim=1)

    losses: list[torch.Tensor] = []
    done = 0
    while done < width:
        rows = candidates[done : done + chunk]
        out_of_memory = False
        try:
            with torch.no_grad():
                logits = model(input_ids=ids(rows), logits_to_keep=len(problem.target) + 1, use_cache=False).logits
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            out_of_memory = True
        if out_of_memory:  # outside except: its frames would hold the failed pass's tensors
            chunk = max(1, chunk // 2)
            torch.cuda.empty_cache()
            continue
        losses.append(_target_loss(logits[:, :-1], problem.target).cpu())
        done += len(rows)
    return torch.cat(losses), chunk


def initial_suffix(tokenizer: Any, length: int) -> torch.Tensor:
    ids = tokenizer.encode(" !" * length, add_special_tokens=False)[:length]
    return torch.tensor(ids, dtype=torch.long)


def optimise_suffix(
    model: Any,
    tokenizer: Any,
    problem: Problem,
    budget: Budget,
    allowed: torch.Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Suffix:
    """Algorithm 1 for ``budget.steps`` iterations; the lowest-loss suffix seen."""
    generator = torch.Generator().manual_seed(budget.seed)
    if allowed is None:
        allowed = allowed_tokens(tokenizer, model.get_input_embeddings().weight.shape[0])
    suffix = initial_suffix(tokenizer, budget.suffix_tokens)
    best_loss = initial = float(target_losses(model, problem, suffix.unsqueeze(0))[0][0])
    best = suffix
    history = []
    chunk = CHUNK
    for step in range(budget.steps):
        grad = token_gradients(model, problem, suffix)
        candidates = keep_retokenizable(
            tokenizer, sample_candidates(suffix, grad, budget.top_k, budget.width, allowed, generator)
        )
        if len(candidates):
            losses, chunk = target_losses(model, problem, candidates, chunk)
            pick = int(losses.argmin())
            suffix = candidates[pick]
            if float(losses[pick]) < best_loss:
                best = suffix
                best_loss = float(losses[pick])
        history.append(best_loss)
        if on_step is not None:
            on_step(step, best_loss)
    return Suffix(tuple(best.tolist()), tokenizer.decode(best), best_loss, initial, tuple(history))


# ---------------------------------------------------------------- cached suffixes, one per prompt (not hashed)


def suffix_key(prompt: str, target: str, budget: Budget) -> str:
    text = json.dumps([prompt, target, repr(budget), algorithm_source()])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _read(path: Path) -> Suffix | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Suffix(tuple(data["ids"]), data["text"], data["loss"], data["initial_loss"], tuple(data["losses"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, torn or of another layout: optimise again


def optimised_suffixes(
    model: Any,
    tokenizer: Any,
    problems: dict[str, tuple[Problem, str]],
    budget: Budget,
    cache_dir: Path | None,
    say: Callable[[str], None],
) -> dict[str, Suffix]:
    """``problems``: prompt -> (problem, target text); each suffix read from ``cache_dir`` or optimised into it."""
    allowed = None
    found: dict[str, Suffix] = {}
    cached = 0
    for number, (prompt, (problem, target)) in enumerate(problems.items(), start=1):
        path = cache_dir / f"{suffix_key(prompt, target, budget)}.json" if cache_dir is not None else None
        hit = _read(path) if path is not None else None
        if hit is not None:
            found[prompt] = hit
            cached = cached + 1
            continue
        if allowed is None:
            allowed = allowed_tokens(tokenizer, model.get_input_embeddings().weight.shape[0])
        started = time.perf_counter()
        with tqdm(total=budget.steps, desc=f"jailbreak: GCG prompt {number}/{len(problems)}", leave=False) as bar:

            def step(_: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")

            suffix = optimise_suffix(model, tokenizer, problem, budget, allowed, on_step=step)
        found[prompt] = suffix
        say(
            f"jailbreak: GCG prompt {number}/{len(problems)}: target loss {suffix.initial_loss:.3f} -> "
            f"{suffix.loss:.3f} in {budget.steps} steps, {time.perf_counter() - started:.0f} s"
        )
        if path is not None:
            write_record(path, asdict(suffix))
    if cached:
        say(f"jailbreak: GCG: {cached} of {len(problems)} suffixes read from {cache_dir} (found by an earlier run)")
    stuck = sum(s.loss >= s.initial_loss for s in found.values())
    if stuck:
        say(
            f"jailbreak: GCG did not lower the target loss for {stuck} of {len(found)} prompts in {budget.steps} "
            "steps (their suffix is the initial one); raise --gcg-steps"
        )
    return found

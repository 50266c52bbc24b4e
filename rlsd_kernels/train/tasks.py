"""Verifiable tasks for the reference trainer.

A task generates problems from a seed (prompt + reference answer), renders the student prompt and the privileged
(teacher) prompt that also shows the reference answer, and verifies a completion (reward 1 for an exactly correct
final answer, else 0). To plug in another task, subclass :class:`Task` (``make_problem``, optionally ``prompt``,
``privileged_prompt``, ``verify``) and register it in ``TASKS``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Type


@dataclass(frozen=True)
class Problem:
    question: str  # what the student sees (without the answer)
    answer: str  # the reference answer, the privileged information r


class Task:
    """Base class: a seeded problem generator with a held-out eval split and an exact-match verifier."""

    name = "task"
    hint_sep = "|"  # privileged prompt = question + hint_sep + answer + answer_sep
    answer_sep = "="

    def __init__(self, eval_size: int = 256, eval_seed: int = 1234):
        if eval_size < 1:
            raise ValueError(f"eval_size must be >= 1, got {eval_size}")
        rng = random.Random(eval_seed)
        seen, evals = set(), []
        tries = 0
        while len(evals) < eval_size:
            p = self.make_problem(rng)
            tries += 1
            if p.question not in seen:
                seen.add(p.question)
                evals.append(p)
            elif tries > 100 * eval_size:
                raise ValueError(f"task {self.name!r} cannot produce {eval_size} distinct eval problems")
        self._eval = evals
        self._eval_questions = frozenset(seen)

    # ---- to override -------------------------------------------------------------------------------------
    def make_problem(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    @property
    def alphabet(self) -> str:
        """Every character prompts and answers can contain (for the built-in character-level tokenizer)."""
        raise NotImplementedError

    max_answer_chars = 8

    def prompt(self, p: Problem) -> str:
        return p.question + self.answer_sep

    def privileged_prompt(self, p: Problem) -> str:
        return p.question + self.hint_sep + p.answer + self.answer_sep

    def target(self, p: Problem) -> str:
        """The supervised completion for the warm start (the tokenizer's EOS is appended by the trainer)."""
        return p.answer

    def verify(self, p: Problem, completion: str) -> float:
        return 1.0 if completion.strip() == p.answer else 0.0

    # ---- splits ------------------------------------------------------------------------------------------
    def sample_train(self, rng: random.Random) -> Problem:
        """A training problem; never one of the held-out eval problems."""
        while True:
            p = self.make_problem(rng)
            if p.question not in self._eval_questions:
                return p

    def eval_problems(self) -> List[Problem]:
        return list(self._eval)


class AdditionTask(Task):
    """``a + b`` with ``digits``-digit zero-padded operands, e.g. ``'047+512='`` -> ``'559'``."""

    name = "addition"

    def __init__(self, digits: int = 3, eval_size: int = 256, eval_seed: int = 1234):
        if not 1 <= int(digits) <= 9:
            raise ValueError(f"--digits must be in [1, 9], got {digits}")
        self.digits = int(digits)
        super().__init__(eval_size, eval_seed)

    @property
    def alphabet(self) -> str:
        return "0123456789+" + self.hint_sep + self.answer_sep

    @property
    def max_answer_chars(self) -> int:
        return self.digits + 1

    def make_problem(self, rng: random.Random) -> Problem:
        hi = 10 ** self.digits
        a, b = rng.randrange(hi), rng.randrange(hi)
        return Problem(f"{a:0{self.digits}d}+{b:0{self.digits}d}", str(a + b))


class ChainSumTask(Task):
    """``operands`` numbers of ``digits`` digits whose answer is the running partial sums, each zero-padded to the
    width of the largest possible sum, e.g. 5 one-digit operands: ``'3+7+2+9+4='`` -> ``'10,12,21,25'``.

    Every partial sum depends on the one before it, so an early wrong digit makes every later sum wrong: the answer
    is long (``(operands - 1) * (width + 1) - 1`` characters, 11 for the example) and its intermediate tokens decide
    correctness, which is where per-token credit (RLSD's weights) can matter. Exact match on the whole chain."""

    name = "chainsum"
    sum_sep = ","

    def __init__(self, digits: int = 1, operands: int = 5, eval_size: int = 256, eval_seed: int = 1234):
        if not 1 <= int(digits) <= 4:
            raise ValueError(f"--digits must be in [1, 4] for the chainsum task, got {digits}")
        if not 3 <= int(operands) <= 9:
            raise ValueError(f"--operands must be in [3, 9], got {operands}")
        self.digits, self.operands = int(digits), int(operands)
        self.width = len(str(self.operands * (10 ** self.digits - 1)))
        super().__init__(eval_size, eval_seed)

    @property
    def alphabet(self) -> str:
        return "0123456789+" + self.sum_sep + self.hint_sep + self.answer_sep

    @property
    def max_answer_chars(self) -> int:
        return (self.operands - 1) * (self.width + 1) - 1

    def make_problem(self, rng: random.Random) -> Problem:
        hi = 10 ** self.digits
        xs = [rng.randrange(hi) for _ in range(self.operands)]
        partial = [sum(xs[:i + 1]) for i in range(1, self.operands)]
        return Problem("+".join(f"{x:0{self.digits}d}" for x in xs),
                       self.sum_sep.join(f"{s:0{self.width}d}" for s in partial))


TASKS: Dict[str, Type[Task]] = {"addition": AdditionTask, "chainsum": ChainSumTask}


def make_task(name: str, **kwargs) -> Task:
    """The task ``name``; keyword arguments that its constructor does not take (e.g. ``operands`` for addition) are
    dropped, so that one config serves every task."""
    if name not in TASKS:
        raise ValueError(f"--task must be one of {sorted(TASKS)}, got {name!r}")
    import inspect

    params = inspect.signature(TASKS[name].__init__).parameters
    return TASKS[name](**{k: v for k, v in kwargs.items() if k in params})

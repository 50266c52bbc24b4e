import random

import pytest

from rlsd_kernels.train.tasks import AdditionTask, Problem, Task, TASKS, make_task


def test_addition_verifier_exact_match():
    t = AdditionTask(digits=3, eval_size=8)
    p = Problem("047+512", "559")
    assert t.prompt(p) == "047+512="
    assert t.privileged_prompt(p) == "047+512|559="
    assert t.verify(p, "559") == 1.0
    assert t.verify(p, " 559 ") == 1.0
    for wrong in ("558", "0559", "55", "", "559559", "5 59"):
        assert t.verify(p, wrong) == 0.0


def test_addition_answers_are_correct_and_seeded():
    t = AdditionTask(digits=3, eval_size=64, eval_seed=7)
    for p in t.eval_problems():
        a, b = p.question.split("+")
        assert len(a) == len(b) == 3 and int(p.answer) == int(a) + int(b)
    assert [p.question for p in AdditionTask(digits=3, eval_size=64, eval_seed=7).eval_problems()] == \
        [p.question for p in t.eval_problems()]


def test_train_split_never_contains_eval_problems():
    t = AdditionTask(digits=1, eval_size=50)  # half of the 100 problems held out
    held = {p.question for p in t.eval_problems()}
    assert len(held) == 50
    rng = random.Random(0)
    seen = {t.sample_train(rng).question for _ in range(2000)}
    assert not seen & held and len(seen) == 50


def test_custom_task_plugs_in():
    class Reverse(Task):
        name = "reverse"
        alphabet = "abc"
        max_answer_chars = 4

        def make_problem(self, rng):
            s = "".join(rng.choice("abc") for _ in range(4))
            return Problem(s, s[::-1])

    t = Reverse(eval_size=10)
    p = t.eval_problems()[0]
    assert t.verify(p, p.question[::-1]) == 1.0
    assert t.privileged_prompt(p).startswith(p.question)


def test_bad_task_args():
    with pytest.raises(ValueError, match="--task"):
        make_task("nope")
    with pytest.raises(ValueError, match="--digits"):
        make_task("addition", digits=0)
    assert "addition" in TASKS

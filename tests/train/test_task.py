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


def test_chainsum_answers_are_the_running_sums_with_8_plus_tokens():
    t = make_task("chainsum", digits=1, operands=5, eval_size=64)
    assert t.max_answer_chars == 11
    for p in t.eval_problems():
        xs = [int(x) for x in p.question.split("+")]
        sums = [int(s) for s in p.answer.split(",")]
        assert len(xs) == 5 and all(len(x) == 1 for x in p.question.split("+"))
        assert sums == [sum(xs[:i + 1]) for i in range(1, 5)]
        assert len(p.answer) == t.max_answer_chars >= 8  # zero-padded: every answer has the same length
        assert set(t.privileged_prompt(p)) <= set(t.alphabet)
    # 2-digit operands: sums up to 495, width 3
    p = make_task("chainsum", digits=2, operands=3, eval_size=4).eval_problems()[0]
    assert all(len(s) == 3 for s in p.answer.split(","))


def test_chainsum_generator_is_deterministic():
    a, b = (make_task("chainsum", digits=1, eval_size=32, eval_seed=5) for _ in range(2))
    assert [(p.question, p.answer) for p in a.eval_problems()] == [(p.question, p.answer) for p in b.eval_problems()]
    ra, rb = random.Random(3), random.Random(3)
    assert [a.sample_train(ra) for _ in range(50)] == [b.sample_train(rb) for _ in range(50)]
    other = make_task("chainsum", digits=1, eval_size=32, eval_seed=6)
    assert [p.question for p in other.eval_problems()] != [p.question for p in a.eval_problems()]


def test_chainsum_verifier_is_exact_match_on_the_whole_chain():
    t = make_task("chainsum", digits=1, operands=5, eval_size=4)
    p = Problem("3+7+2+9+4", "10,12,21,25")
    assert t.prompt(p) == "3+7+2+9+4=" and t.privileged_prompt(p) == "3+7+2+9+4|10,12,21,25="
    assert t.verify(p, "10,12,21,25") == 1.0
    # a wrong intermediate sum fails even when the final total is right; so do format slips
    for wrong in ("10,13,21,25", "10,12,21,26", "10,12,21", "10,12,21,25,", "10 12 21 25", "25", ""):
        assert t.verify(p, wrong) == 0.0


def test_chainsum_train_split_is_disjoint_from_held_out():
    t = make_task("chainsum", digits=1, operands=3, eval_size=500)  # half of the 1000 problems held out
    held = {p.question for p in t.eval_problems()}
    assert len(held) == 500
    rng = random.Random(0)
    seen = {t.sample_train(rng).question for _ in range(20000)}
    assert not seen & held and len(seen) == 500


def test_bad_chainsum_args():
    with pytest.raises(ValueError, match="--operands"):
        make_task("chainsum", operands=2)
    with pytest.raises(ValueError, match="--digits"):
        make_task("chainsum", digits=5)
    assert make_task("addition", digits=1, operands=7, eval_size=4).digits == 1  # addition ignores --operands

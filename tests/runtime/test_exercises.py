"""Checks minialign/tools/exercises.py, its command (exercises_command.py) and the ``expect`` helper:
the markers agree with the registry, ``make`` removes every marked body (the copy imports, each
exercise's tests fail with NotImplementedError), ``check`` passes an unmodified copy and reports a
wrong solution with the hand-worked case and the numbers expected and received."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from handworked import expect

from minialign.runtime.cli import main as cli
from minialign.tools import exercises, exercises_command

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# expect: the hand-worked case and both numbers in the failure
# ----------------------------------------------------------------------------------------------


def test_expect_message_quotes_the_case_and_both_numbers():
    expect(0.6436694, 0.643669, abs=1e-6)
    expect([0.5, 0.0], [0.5, 0.0])
    expect(float("nan"), float("nan"))
    with pytest.raises(AssertionError) as e:
        result = -0.643669
        # E9: mean = (0.313262 + 0.974077) / 2 = 0.643669
        #     (a second line of the case)
        expect(result, 0.643669, abs=1e-5)
    message = str(e.value)
    assert "E9: mean = (0.313262 + 0.974077) / 2 = 0.643669" in message
    assert "    (a second line of the case)" in message          # the case keeps its alignment
    assert "expected: 0.643669" in message and "received: -0.643669" in message
    with pytest.raises(AssertionError, match=r"first difference at index \[1\]"):
        expect([1.0, 2.0, 3.0], [1.0, 2.5, 3.0])
    with pytest.raises(AssertionError, match=r"shape: expected \(2,\), received \(3,\)"):
        expect([1.0, 2.0, 3.0], [1.0, 2.0])


# ----------------------------------------------------------------------------------------------
# markers and the registry
# ----------------------------------------------------------------------------------------------

SOURCE = '''
def f(x):
    """A docstring that quotes a marker:
    # Exercise f (E0): from here to the end of the function.
    """
    if x is None:
        raise ValueError("x")
    # Exercise f (E0): from here to the end of the function.
    y = x + 1
    return y * 2


def g(x):
    # Exercise g (E1): from here to "End of exercise g".
    y = x - 1
    # End of exercise g.
    return y
'''


def test_find_and_strip_regions(monkeypatch):
    regions = exercises.find_regions(SOURCE)
    assert [(r.name, r.equations) for r in regions] == [("f", "E0"), ("g", "E1")]  # not the docstring's
    for name in ("f", "g"):
        monkeypatch.setitem(exercises.BY_NAME, name, exercises.Exercise(
            name, "x.py", "E0", "title", (r"y = 2(x + 1)",), "x (B,) -> (B,)", "04_dpo.py"))
    stripped = exercises.strip_exercises(SOURCE, {"f", "g"})
    assert "y = x + 1" not in stripped and "y = x - 1" not in stripped and "return y * 2" not in stripped
    assert 'raise ValueError("x")' in stripped                      # the input check stays
    assert "    # End of exercise g.\n    return y" in stripped      # code after an end marker stays
    assert "$$y = 2(x + 1)$$" in stripped and "shapes: x (B,) -> (B,)" in stripped
    namespace = {}
    exec(compile(stripped, "stripped", "exec"), namespace)
    with pytest.raises(NotImplementedError, match="exercise f"):
        namespace["f"](1)
    with pytest.raises(ValueError):
        namespace["f"](None)
    only_g = exercises.strip_exercises(SOURCE, {"g"})
    assert "return y * 2" in only_g and "y = x - 1" not in only_g


def test_a_marker_inside_a_loop_or_outside_a_function_is_an_error():
    with pytest.raises(ValueError, match="must be indented as the body of f"):
        exercises.find_regions("def f(x):\n    for i in x:\n        # Exercise f (E0): here\n        pass\n")
    with pytest.raises(ValueError, match="not inside a function"):
        exercises.find_regions("x = 1\n# Exercise f (E0): here\ny = 2\n")


def test_every_exercise_has_its_marker_and_its_tests():
    exercises.check_registry()                                     # markers <-> registry
    marked = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for name in re.findall(r'@pytest\.mark\.exercise\("(\w+)"\)', path.read_text()):
            marked.setdefault(name, set()).add(path.name)
    assert set(marked) <= set(exercises.BY_NAME), set(marked) - set(exercises.BY_NAME)
    for e in exercises.EXERCISES:
        # graded by the mirrored test file only: tests/equations/test_dpo.py for minialign/dpo.py
        assert marked.get(e.name) == {Path(e.test_file).name}, (e.name, marked.get(e.name))
        assert (ROOT / e.test_file).is_file() and e.test_file.startswith("tests/equations/"), e.test_file
        assert (ROOT / "tutorials" / e.tutorial).is_file()
    assert 14 <= len(exercises.EXERCISES) <= 30  # the course's 16 and the families' members


def test_select_by_name_or_file():
    assert [e.name for e in exercises.select(["dpo"])] == ["optimal_policy", "implied_reward", "dpo_loss"]
    assert [e.name for e in exercises.select(["grpo_loss", "ops"])] == ["token_logps", "kl_estimators",
                                                                       "grpo_loss"]
    assert len(exercises.select(None)) == len(exercises.EXERCISES)
    with pytest.raises(ValueError, match="unknown exercise"):
        exercises.select(["dpo_los"])


# ----------------------------------------------------------------------------------------------
# make and check on the real package (each check is one pytest subprocess, a few seconds)
# ----------------------------------------------------------------------------------------------


def solve(copy: Path, exercise: str, code: str) -> None:
    """Write a student's solution where ``make`` left the raise of ``exercise``."""
    path = copy / "minialign" / exercises.BY_NAME[exercise].file
    source = path.read_text()
    m = re.search(rf'^( *)raise NotImplementedError\("exercise {exercise} .*$', source, re.M)
    body = "\n".join(m.group(1) + line for line in code.strip("\n").splitlines())
    path.write_text(source[:m.start()] + body + source[m.end():])


def test_make_removes_every_marked_body(tmp_path):
    copy = tmp_path / "course"
    assert cli(["exercises", "make", str(copy)]) == 0
    assert (copy / "EXERCISES.md").is_file() and (copy / "tests" / "equations" / "handworked.py").is_file()
    for e in exercises.EXERCISES:
        assert f'raise NotImplementedError("exercise {e.name} ({e.equations})' in \
            (copy / "minialign" / e.file).read_text(), e.name
    # the copy imports: every module of the package and its subpackages, from the copy
    modules = sorted(".".join(p.relative_to(copy).with_suffix("").parts) for p in (copy / "minialign").rglob("*.py")
                     if p.stem not in ("__init__", "__main__", "hf", "gpt2"))
    code = "import importlib, minialign; print(minialign.__file__); " + "; ".join(
        f"importlib.import_module('{m}')" for m in modules)
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env={"PYTHONPATH": str(copy)},
                         capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()).parent == copy / "minialign"
    # each exercise's tests fail with NotImplementedError, at least one with its own
    result = exercises_command.run_tests(copy, exercises.EXERCISES)
    rows = exercises_command.grade(exercises.EXERCISES, result)
    for row in rows:
        name = row["exercise"].name
        assert row["tests"] and not row["passed"], name
        assert all(t["error"] == "NotImplementedError" for t in row["tests"]), (name, row["tests"])
        assert any(f"exercise {name} (" in t["message"] for t in row["tests"]), name
    with pytest.raises(FileExistsError, match="--overwrite"):
        exercises_command.make(copy)


def test_check_passes_an_unmodified_copy(tmp_path, capsys):
    copy = tmp_path / "reference"
    shutil.copytree(exercises.PACKAGE, copy / "minialign", ignore=shutil.ignore_patterns("__pycache__"))
    assert exercises_command.check(copy) == 0
    out = capsys.readouterr().out
    assert f"{len(exercises.EXERCISES)} of {len(exercises.EXERCISES)} exercises passed" in out
    assert "FAILED" not in out and "NotImplementedError" not in out


def test_wrong_solutions_are_reported_with_expected_and_received(tmp_path, capsys):
    copy = tmp_path / "student"
    exercises_command.make(copy, ["dpo_loss", "group_advantages", "kl_estimators", "value_loss", "lm_loss"])
    solve(copy, "dpo_loss", """
chosen_rewards = beta * (pi_w - ref_w)
rejected_rewards = beta * (pi_l - ref_l)
loss = F.logsigmoid(chosen_rewards - rejected_rewards).mean()    # the sign flipped
return loss, chosen_rewards, rejected_rewards
""")
    solve(copy, "group_advantages", """
r = rewards.view(-1, group_size)
advantages = r / (r.std(dim=1, keepdim=True) + eps)              # no baseline: r, not r - mean
return advantages.reshape(-1)
""")
    solve(copy, "value_loss", "return values.squared()")             # an error in the student's code
    solve(copy, "lm_loss", "loss = (")                                 # a file that does not compile
    assert cli(["exercises", "check", str(copy)]) == 1
    out = capsys.readouterr().out
    table = {row[0]: row[-1] for row in (re.split(r"\s{2,}", line) for line in out.split("\n\n")[0].splitlines())}
    assert table["dpo_loss"].startswith("FAILED") and table["group_advantages"].startswith("FAILED")
    assert table["kl_estimators"] == "not written yet (NotImplementedError)"
    assert table["lm_loss"] == "FAILED: test_pretrain.py does not import"   # and the others still ran
    assert "SyntaxError: '(' was never closed" in out
    assert re.search(r"AttributeError: .*squared.*\n  \(raised at minialign/ppo\.py:\d+\)", out)
    # the DPO case of tests/equations/test_dpo.py::test_e9_e10_by_hand, its numbers
    dpo = out[out.index("--- dpo_loss"):out.index("--- group_advantages")]
    assert "mean = (0.313262 + 0.974077) / 2 = 0.643669" in dpo
    assert "expected: 0.643669\n  received: -0.6436694" in dpo
    # GRPO's advantage of the group (1, 0, 0, 3): with the baseline 0, -0.707, -0.707, 1.414
    grpo = out[out.index("--- group_advantages"):]
    assert "E11: mean = (1 + 0 + 0 + 3) / 4 = 1" in grpo
    assert "expected: [0, -0.707057, -0.707057, 1.414114]\n  received: [0.7070568, 0, 0, 2.12117]" in grpo
    # a correct solution now passes
    solve_right = exercises_command.make(tmp_path / "right", ["group_advantages"])
    assert [e.name for e in solve_right] == ["group_advantages"]
    solve(tmp_path / "right", "group_advantages", """
r = rewards.view(-1, group_size)
advantages = r - r.mean(dim=1, keepdim=True)
if scale_by_std:
    advantages = advantages / (r.std(dim=1, keepdim=True) + eps)
spread = r.max(dim=1, keepdim=True).values > r.min(dim=1, keepdim=True).values
return torch.where(spread, advantages, torch.zeros_like(advantages)).reshape(-1)
""")
    assert exercises_command.check(tmp_path / "right") == 0


def test_check_names_a_missing_copy(tmp_path):
    with pytest.raises(FileNotFoundError, match="exercises make"):
        exercises_command.check(tmp_path / "nothing")


@pytest.mark.slow
def test_train_runs_the_tutorial_with_the_copy_beside_the_reference(tiny_run, tmp_path, capsys):
    copy = tmp_path / "student"
    exercises_command.make(copy, ["dpo_loss"])
    solve(copy, "dpo_loss", """
print("dpo_loss written by the student")
chosen_rewards = beta * (pi_w - ref_w)
rejected_rewards = beta * (pi_l - ref_l)
loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
return loss, chosen_rewards, rejected_rewards
""")
    flags = "--steps 2 --batch-size 8 --samples 1 --eval-pairs 8 --eval-every 1"
    assert cli(["exercises", "check", str(copy), "dpo_loss", "--train", "--runs", str(tiny_run),
                "--train-args", flags]) == 0
    out = capsys.readouterr().out
    # both ran from the same SFT model; the same math gives the same seeded figures
    rows = {m[0]: (m[1], m[2]) for m in re.findall(r"^\s+(\w+)\s+(-?[\d.]+)\s+(-?[\d.]+)$", out, re.M)}
    assert set(rows) == {"true_reward_before", "true_reward", "kl", "heldout_accuracy"}
    assert all(ref == yours for ref, yours in rows.values()), rows
    # and the student's run really ran the student's code
    assert "written by the student" in (copy / "runs" / "yours" / "04_dpo.log").read_text()
    assert "written by the student" not in (copy / "runs" / "reference" / "04_dpo.log").read_text()


def test_each_hint_gives_the_equation_as_the_docs_write_it():
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    for e in exercises.EXERCISES:
        for latex in e.latex:
            assert latex in docs, f"exercise {e.name}: its equation is not written so in docs/: {latex}"

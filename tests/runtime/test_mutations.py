"""The mutation pass (``tests/runtime/mutations.py``) stays runnable: every mutation still finds, exactly
once, the line of code it breaks, and names a test file that exists. (The pass itself runs pytest
once per mutation, minutes in all, so it is a command, not a test: ``python tests/runtime/mutations.py``.)"""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def mutations():
    spec = importlib.util.spec_from_file_location("mutations", ROOT / "tests" / "runtime" / "mutations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mutation_finds_its_line_once_and_its_test_file():
    module = mutations()
    found = module.MUTATIONS
    assert len(found) >= 70
    for file, original, mutated, what, test_file in found:
        source = (ROOT / "minialign" / file).read_text()
        assert source.count(original) == 1, f"{file}: the line that '{what}' breaks is gone or repeated: {original!r}"
        assert mutated != original
        assert module.test_path(file, test_file).is_file(), test_file  # the pass runs it from there
        if not file.startswith("stages/"):                        # a formula's guard is an equation test
            assert module.test_path(file, test_file).parent == ROOT / "tests" / "equations", (file, test_file)
    assert module.RUNTIME == ROOT / "tests" / "runtime" and module.EQUATIONS == ROOT / "tests" / "equations"
    # each algorithm file and the shared math have their mutations
    assert {m[0] for m in found} >= {"ops.py", "reward_model.py", "dpo.py", "ppo.py", "grpo.py", "pretrain.py"}

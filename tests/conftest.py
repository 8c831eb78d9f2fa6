"""Shared fixtures (a tiny world, tiny pre-trained / SFT checkpoints built once per session) and the
exercise options that ``minialign exercises check`` runs the tests with.

The tests are in two folders: ``equations/`` holds the hand-computed tests of the reading list
(``equations/test_dpo.py`` checks ``minialign/dpo.py``), ``runtime/`` everything else (the stage
runs, the CLI, faults, docs, real models). Their helper modules are plain modules beside the tests
that use them (``equations/handworked.py``; ``runtime/seeded_runs.py``, ``mutations.py``,
``accumulation.py``, ``browser.py``): both folders go on the import path here, so that any test
imports them by name (``from handworked import expect``). No two files of the two folders share a
name, as pytest's default import mode needs."""

import json
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
for folder in ("runtime", "equations"):
    if str(TESTS / folder) not in sys.path:
        sys.path.insert(0, str(TESTS / folder))

from handworked import hand_worked_case  # noqa: E402 - found through the path set just above

from minialign.model import GPT, GPTConfig
from minialign.toyworld import ToyWorld, WorldConfig
from minialign.runtime.optim import Update

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=48)


@pytest.fixture
def benchmark_output(capsys):
    """``run(name, argv)``: ``benchmarks/<name>.py``'s ``main(argv)`` in this process; what it printed.
    The scripts set the thread count of the whole process, so it is put back after."""
    import importlib.util

    def run(name: str, argv: list[str]) -> str:
        spec = importlib.util.spec_from_file_location(name, TESTS.parent / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        threads = torch.get_num_threads()
        try:
            module.main(argv)
        finally:
            torch.set_num_threads(threads)
        return capsys.readouterr().out
    return run


@pytest.fixture(scope="session")
def world():
    return ToyWorld(WorldConfig(seed=0))


@pytest.fixture
def tiny_model(world):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=world.tokenizer.vocab_size, **TINY))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder holding ``pretrain/model.pt`` and ``sft/model.pt`` of a tiny model (seconds).

    Algorithm tests start from ``<tiny_run>/sft/model.pt`` with ``out=<their own tmp folder>``.
    """
    from minialign.stages.pretrain import PretrainConfig, main as pretrain
    from minialign.stages.sft import SFTConfig, main as sft

    out = tmp_path_factory.mktemp("tiny_run")
    pretrain(PretrainConfig(out=str(out), steps=40, batch_size=32, corpus_size=2000, eval_size=100,
                            eval_every=20, progress=False, device="cpu", **TINY))
    sft(SFTConfig(out=str(out), steps=30, batch_size=32, num_examples=500, eval_size=100,
                  eval_every=15, progress=False, device="cpu"))
    return out


# ----------------------------------------------------------------------------------------------
# exercises (``minialign exercises check``): --exercise NAMES runs only the tests marked
# @pytest.mark.exercise(NAME); --exercise-report FILE writes their outcomes, the error and the
# hand-worked case of each failure, and which minialign package they ran against
# ----------------------------------------------------------------------------------------------


def pytest_addoption(parser):
    group = parser.getgroup("minialign exercises")
    group.addoption("--exercise", default="", help="comma-separated exercise names: run only their tests")
    group.addoption("--exercise-report", default="", help="write the exercise tests' outcomes here (JSON)")


def pytest_collection_modifyitems(config, items):
    wanted = {n for n in config.getoption("--exercise").split(",") if n}
    if not wanted:
        return
    keep = [i for i in items if {m.args[0] for m in i.iter_markers("exercise")} & wanted]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep


def pytest_configure(config):
    path = config.getoption("--exercise-report")
    if path:
        config.pluginmanager.register(ExerciseReport(Path(path)), "minialign-exercise-report")


class ExerciseReport:
    """Each exercise test's outcome, its error, the hand-worked case and where it was raised."""

    def __init__(self, path: Path):
        self.path, self.tests, self.errors = path, {}, []

    def pytest_collectreport(self, report):
        if report.failed:
            self.errors.append({"file": report.nodeid, "message": str(report.longrepr)[-2000:]})

    def pytest_runtest_makereport(self, item, call):
        entry = self.tests.setdefault(item.nodeid, {
            "nodeid": item.nodeid, "exercises": [m.args[0] for m in item.iter_markers("exercise")],
            "outcome": "passed", "error": "", "message": "", "case": [], "where": ""})
        exc = call.excinfo
        if exc is None or entry["outcome"] != "passed":
            return
        if exc.typename == "Skipped":
            entry["outcome"] = "skipped"
            return
        entry.update(outcome="error" if call.when == "setup" else "failed", error=exc.typename,
                     message=str(exc.value))
        frames = list(exc.traceback)                 # TracebackEntry.lineno is 0-based
        in_test = [f for f in frames if str(f.path) == str(item.path)]
        if in_test:
            entry["case"] = hand_worked_case(str(item.path), in_test[-1].lineno + 1)
        in_package = [f for f in frames if Path(str(f.path)).parent.name == "minialign"]
        if in_package:
            entry["where"] = f"minialign/{Path(str(in_package[-1].path)).name}:{in_package[-1].lineno + 1}"

    def pytest_sessionfinish(self, session):
        import minialign
        self.path.write_text(json.dumps({
            "package": str(Path(minialign.__file__).parent), "tests_from": str(Path(__file__).parent),
            "tests": list(self.tests.values()), "errors": self.errors}, indent=1))


# ----------------------------------------------------------------------------------------------
# a policy whose answers are known, for the hand-worked tests of ppo_iteration and grpo_iteration
# ----------------------------------------------------------------------------------------------


def eos_policy(world, eos_logit: float) -> GPT:
    """A float64 GPT whose every next-token logit is ``eos_logit`` for EOS and 0 for the rest:
    ``ln_f`` outputs its bias whatever the input (weight 0), and the tied head reads that bias
    against the one non-zero embedding, EOS's first coordinate."""
    tok = world.tokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=8, block_size=48)).double()
    with torch.no_grad():
        model.wte.weight.zero_()
        model.wte.weight[tok.eos_id, 0] = 1.0
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
        model.ln_f.bias[0] = eos_logit
    return model


class RecordingUpdate:
    """The ``update`` hook without an optimizer: it runs ``loss_of`` on the whole minibatch (one
    micro-batch) and keeps what it returned, so the policy stays pi_old for every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, rows, loss_of):
        loss, units, total, stats = loss_of(rows)
        self.calls.append({"rows": sorted(rows.tolist()), "loss": loss.item(), "units": units, "total": total})
        return Update(grad_norm=0.0, extras=[stats])


# ----------------------------------------------------------------------------------------------
# data files for the tests of --data: rows as JSONL, a string row written as it is (a bad line)
# ----------------------------------------------------------------------------------------------


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path

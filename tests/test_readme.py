"""The README never lies: CI runs exactly the README's install and test commands."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ci_section(name: str) -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    i = lines.index(f"# --- README: {name} ---")
    return lines[i + 1].strip()


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    for name in ("install", "test"):
        command = ci_section(name)
        assert f"\n{command}\n" in readme, f"README does not show the CI {name} command {command!r}"

"""The README never lies: CI runs exactly the README's install and test commands."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ci_sections() -> dict[str, str]:
    """name -> the command under each ``# --- README: name ---`` line of .ci/run."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return {line.removeprefix("# --- README: ").removesuffix(" ---"): lines[i + 1].strip()
            for i, line in enumerate(lines) if line.startswith("# --- README: ")}


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    sections = ci_sections()
    assert {"install", "test", "docs install", "site"} <= set(sections), sections
    for name, command in sections.items():
        assert f"\n{command}\n" in readme, f"README does not show the CI {name} command {command!r}"

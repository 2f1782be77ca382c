"""README's set-up commands are the ones CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command(marker):
    lines = (ROOT / "README.md").read_text().splitlines()
    i = lines.index(f"<!-- {marker} -->")
    assert lines[i + 1] == "```bash"
    return lines[i + 2]


def test_ci_runs_the_readme_test_command():
    assert _command("test-command") in (ROOT / ".ci/run").read_text().splitlines()


def test_readme_main_command_installs_before_running():
    main = _command("main-command")
    assert main.index("pip install torch==2.13.0") < main.index("pip install -e") < main.index("revnets")

"""The README's two set-up commands are the project's contract with a newcomer and with CI."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_ci_runs_the_readme_test_command():
    main_job, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == tests
    assert "pytest" in tests and "simulations." in main_job
    # Both set the environment up from nothing, the same way.
    assert main_job.split("&&")[0] == tests.split("&&")[0]

"""The README's command blocks run as written (the short ones), in a scratch folder.

Every ``moesim ...`` line of a ``bash`` block is either run here (exit code 0 expected) or listed
in LONG with the reason it is not: none is skipped silently, and LONG must not go stale.
"""

from __future__ import annotations

import os
import re
import shlex

from moesim.cli import main

from .conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")

# command prefix -> why the test does not run it
LONG = {
    "moesim sweep scenarios/sweeps/deepseek-zipf-x-planner.yaml": "DeepSeek-V3 planner sweep: "
    "minutes",
    "moesim plot results/sweeps/deepseek-zipf-x-planner": "needs the sweep above",
    "moesim sweep mixtral-ep-x-nodes": "Mixtral sweep over nodes: about a minute",
    "moesim plot results/sweeps/mixtral-ep-x-nodes": "needs the sweep above",
    "moesim run scenarios/deepseek-v3-train-2048.yaml --set model.num_layers=8": "plans 256 "
    "experts with moesim's planner: tens of seconds",
    "moesim plot results/deepseek-8blocks-zipf1.2-moesim": "needs the run above",
    "moesim calibrate": "needs torch and half a minute of benchmarks (tests/test_calibrate_suite"
    ".py runs the suite)",
    "moesim run tiny-cpu --set cluster.hardware=results/cpu-local-measured.yaml": "needs the "
    "calibrated profile above",
    "moesim plan scenarios/deepseek-v3-decode-ep.yaml": "plans 58 layers of 256 experts on "
    "EP144: about 15 s",
    "moesim search scenarios/deepseek-v3-train-2048.yaml": "about a minute of simulations "
    "(tests/test_search.py searches tiny cases)",
    "moesim search scenarios/mixtral-8x7b-infer-1node.yaml": "a serving search of 1,664 layouts "
    "(tests/test_search.py covers the serving search on tiny cases)",
    "moesim plot results/serve": "needs the search above",
}


def readme_commands() -> list[str]:
    """The ``moesim`` lines of the README's bash blocks, continuations joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "moesim":
                commands.append(shlex.join(words))
    return commands


COMMANDS = readme_commands()
SHORT = [c for c in COMMANDS if not any(c.startswith(p) for p in LONG)]


def test_every_long_entry_is_still_in_the_readme():
    for prefix in LONG:
        assert any(c.startswith(prefix) for c in COMMANDS), prefix
    assert len(SHORT) >= 6


def test_short_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "scenarios").symlink_to(REPO / "scenarios")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", str(tmp_path))        # as the user's shell expands $PWD
    for command in SHORT:          # in README order: later commands read earlier results
        code = main([os.path.expandvars(word) for word in shlex.split(command)[1:]])
        err = capsys.readouterr().err
        assert code == 0, f"{command}: {err}"
    written = {p.parts[0] for p in (q.relative_to(tmp_path) for q in tmp_path.rglob("*"))}
    assert written <= {"scenarios", "results", "plan.json"}   # the repository is not touched


def test_python_api_block_runs(monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 2 and "import pandas" in blocks[1]   # the second needs pandas
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    rows = namespace["rows"]
    assert [r["scenario"] for r in rows] == ["tiny-cpu"] * 3
    assert namespace["record"]["resolved_scenario"]["routing"]["zipf_s"] == 1.5
    assert rows[1]["devices"] == rows[0]["devices"]

"""The ways to start a tool (issue 9): the `tinymoe` console command, `python -m tinymoe ...`,
`python -m tinymoe.<tool>`, `python run.py`; and every command README.md shows, parsed by the
tool's own parser, so the README cannot drift from the tools."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import tinymoe
from tinymoe import launch
from tinymoe.engine.tokenizer import load_tokenizer
from tinymoe.offload.policy import parse_policy

ROOT = Path(__file__).resolve().parents[1]


def test_the_tinymoe_command_is_a_console_script_for_every_tool(capsys):
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    scripts = re.search(r"\[project\.scripts\]\n(.*?)\n\n", pyproject, flags=re.S).group(1)
    assert re.findall(r'^(\w+) = "(.*)"$', scripts, flags=re.M) == [
        ("tinymoe", "tinymoe.launch:main")
    ]
    for tool in launch.TOOLS:
        with pytest.raises(SystemExit) as done:  # argparse exits after printing help
            launch.main([tool, "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0 and out.startswith(f"usage: tinymoe {tool} ")
    assert launch.main(["nonsense"]) == 2
    assert "unknown tool 'nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["-m", "tinymoe", "evaluate", "--help"], ["-m", "tinymoe.run", "--help"], ["run.py", "-h"]],
)
def test_every_way_of_starting_a_tool(argv):
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.startswith("usage: tinymoe "), p.stderr


def test_importing_tinymoe_loads_no_torch():
    code = "import sys, tinymoe, tinymoe.launch; print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.stdout.strip() == "False"
    assert tinymoe.generate is tinymoe.engine.generate.generate  # the lazy names resolve


def readme_commands() -> list[str]:
    """Every `python run.py`, `python -m tinymoe.X` and `tinymoe X` command in README.md's code
    blocks (backslash continuations joined; a `$ ` prompt stripped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```(?:bash|text)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            for part in line.split("&&"):
                part = part.strip()
                if re.match(r"(python run\.py|python -m tinymoe\b|tinymoe )", part):
                    commands.append(part)
    return commands


def test_readme_shows_the_tools():
    starts = {" ".join(c.split()[:3]) for c in readme_commands()}
    assert "python run.py --prompt" in starts
    assert any(s.startswith("python -m tinymoe.evaluate") for s in starts)


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command):
    """A --help-level dry run: the tool's own parser accepts the flags, and the files and
    folders they name exist, so the README cannot drift from the tools again."""
    words = shlex.split(command)
    if words[:2] == ["python", "run.py"]:
        tool, argv = "run", words[2:]
    elif words[:2] == ["python", "-m"] and words[2].startswith("tinymoe."):
        tool, argv = words[2].removeprefix("tinymoe."), words[3:]
    else:  # `tinymoe TOOL ...` or `python -m tinymoe TOOL ...`
        rest = words[1:] if words[0] == "tinymoe" else words[3:]
        tool, argv = rest[0], rest[1:]
    module = __import__(launch.TOOLS[tool][0], fromlist=["build_parser"])
    args = module.build_parser().parse_args(argv)  # SystemExit (a failure) on a bad flag
    if tool == "bench":
        for name in args.policies.split(","):
            parse_policy(name)  # a TinyMoeError on a policy that does not exist
    for flag in ("model", "text", "prompt_file"):
        if getattr(args, flag, None):
            assert (ROOT / getattr(args, flag)).exists(), (command, flag)
    if tool == "run":
        assert load_tokenizer(ROOT / args.model)  # the default model is shipped

"""loop/generation/environments.py: the sandboxed Python session behind the environment contract
(reset / action / step / close), in a real sandbox; no engine."""
from __future__ import annotations

from loop.generation.environments import TOOL_SYSTEM_PROMPT, PythonSession
from loop.generation.rollout import SamplingConfig, make_environment


def test_python_session_runs_cells_in_one_session_and_formats_the_output():
    env = PythonSession(timeout_s=10, observation_max_chars=1024)
    env.reset("t0")
    try:
        assert env.action("I will not run anything.\n") is None
        assert env.action("```python\nx = 1\n```\nand then more text") is None  # the block must end the turn
        code = env.action("First:\n```python\nx = 6 * 7\n```\n")
        assert code == "x = 6 * 7\n"
        assert env.step(code) == "```output\n\n```\n"
        assert env.step(env.action("```python\nprint(x)\n```")) == "```output\n42\n```\n"  # definitions persist
        assert "ZeroDivisionError" in env.step("1 / 0\n")
        env.reset("t1")  # a new episode: a fresh session
        assert "NameError" in env.step("print(x)\n")
    finally:
        env.close()
    env.close()  # twice is fine


def test_long_output_is_cut_and_a_timeout_says_so():
    env = PythonSession(timeout_s=1, observation_max_chars=16)
    try:
        out = env.step("print('a' * 100)\n")
        assert out == "```output\n" + "a" * 16 + "\n... (output truncated)\n```\n"
    finally:
        env.close()
    env = PythonSession(timeout_s=1, observation_max_chars=1024)
    try:
        assert env.step("while True: pass\n").endswith("(timed out after 1 s)\n```\n")
    finally:
        env.close()


def test_tools_setting_picks_the_environment():
    assert make_environment(SamplingConfig()) is None
    env = make_environment(SamplingConfig(tools=True, tool_timeout_s=3, observation_max_chars=99))
    assert isinstance(env, PythonSession) and (env.timeout_s, env.observation_max_chars) == (3, 99)
    assert env.system_prompt == TOOL_SYSTEM_PROMPT and env.stop == ["```\n", "```output"]

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    # ```python blocks run here; ```py blocks need a device (TensorRT) and are only shown.
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no Python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
    assert (tmp_path / "task0.onnx").is_file()


def test_readme_commands_match_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]" && pytest' in README.read_text()
    assert 'pip install -e ".[dev]" && pytest' in ci

"""The scripts under benchmarks/ whose output README shows."""
import importlib.util
import re
from pathlib import Path


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_table_keeps_a_pipe_in_a_note_inside_its_cell():
    row = {"arch": "ann", "overrides": "train.distill=0.5", "test_accuracy": "0.9133", "wall_seconds": "47",
           "note": "(1 - a) CE + a KL(teacher || student)"}
    header, _, line = load("accuracy").table([row]).split("\n")
    cells = re.split(r"(?<!\\)\|", line)[1:-1]  # Markdown splits cells on every | not escaped
    assert len(cells) == header.count("|") - 1 == 6
    assert cells[-1].strip() == r"(1 - a) CE + a KL(teacher \|\| student)"

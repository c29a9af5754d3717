"""notebooks/: both tutorials execute on CPU (offline, tiny model) and the committed files are the generator's
output with no outputs stored."""

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel", reason="the notebooks run in an ipykernel 'python3' kernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_branching_score.ipynb"]
BUDGET_SECONDS = 120  # per-cell timeout is twice this: a hung notebook fails instead of stalling CI


def load_builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOKS / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebooks_match_the_generator_and_have_no_outputs():
    assert load_builder().main(["--check"]) == 0, "run: python notebooks/build_notebooks.py"
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs must be stripped"


def outputs(nb, kind):
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "stdout" and out.output_type == "stream" and out.name == "stdout":
                found.append(out.text)
            elif kind in out.get("data", {}):
                found.append(out["data"][kind])
    return found


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=BUDGET_SECONDS * 2, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError with the cell's traceback on failure; timeout bounds a hang

    html = [h for h in outputs(nb, "text/html") if "appo-traj" in h]
    assert html and all('class="tok' in h for h in html), "a trajectory rendering is shown"
    assert outputs(nb, "image/png"), "a picture is shown"
    stdout = "".join(outputs(nb, "stdout"))
    if name.startswith("01"):
        assert len(html) == 2 and "mean advantage" in stdout  # BS view, then advantage view
        assert 'class="tok branch"' in html[0]
    else:
        assert "degenerate: [True" in stdout and "BS points" in stdout
    assert not list(NOTEBOOKS.glob("*.png")), "notebooks must write their files to a temporary folder"


def test_notebooks_pick_threads_from_the_load_instead_of_forcing_two():
    setup = load_builder().SETUP
    assert "set_num_threads(2)" not in setup and "set_cpu_threads()" in setup

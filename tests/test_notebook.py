"""examples/python-api.ipynb runs top to bottom in a Jupyter kernel (nbclient), so the notebook
the README points to cannot rot. Its parameters cell is set to the tiny joint model of
test_infer (the bundled one would make it slow); every other cell runs as a user reads it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_infer import models  # noqa: F401  (the tiny joint/seg/cls model folders)

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _text(cell) -> str:
    return "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in cell.get("outputs", []))


def test_python_api_notebook_runs(models, monkeypatch):  # noqa: F811
    nb = nbformat.read(EXAMPLES / "python-api.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "MODEL = None" in params.source  # as shipped: the bundled model
    params.source = f"MODEL = {str(models['joint'])!r}\nIMAGES = 'synthetic/images'"
    # the kernel imports this checkout's dermtool, as the tests do
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    try:
        client.km = client.create_kernel_manager()
        client.start_new_kernel()
        client.start_new_kernel_client()
    except Exception as exc:  # no kernel spec, or a kernel that cannot start here
        client.km = None
        pytest.skip(f"a Jupyter kernel cannot start here ({type(exc).__name__}: {exc})")
    client.execute()
    n_images = len(list((EXAMPLES / "synthetic" / "images").glob("*.jpg")))
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert "mask" in _text(code[2]) and "lesion;" in _text(code[2])
    assert _text(code[3]).count("'") == 2 * n_images  # the streamed labels, one per image
    assert f"{n_images} images: JAC" in _text(code[4])

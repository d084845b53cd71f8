"""Ray is optional: nothing imports it unless ``--engine ray`` is asked for."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import sys
from pathlib import Path
import numpy as np
from PIL import Image
import clipfusion, clipfusion.cli, clipfusion.distributed
from clipfusion.cli import main

root = Path(sys.argv[1])
for i in range(2):
    array = np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(array).save(root / f"{i}.png")
argv = ["predict", str(root / "0.png"), str(root / "1.png"), "--object", "cap", "--preset", "tiny"]
code = main(argv + ["--out", str(root / "out"), "--no-progress", "-q"])
# the saved-fit path too: fit, then predict --fitted (the command --engine ray extends)
fit, ref, image = str(root / "fit"), str(root / "0.png"), str(root / "1.png")
code = code or main(["fit", "--object", "cap", "--refs", ref, "--preset", "tiny", "--out", fit, "-q"])
code = code or main(["predict", "--fitted", fit, image, "--out", str(root / "out2"), "--no-progress", "-q"])
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
print("exit", code, "ray modules:", loaded)
sys.exit(code if code else (3 if loaded else 0))
"""


@pytest.mark.slow
def test_a_local_predict_never_imports_ray(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "ray modules: []" in done.stdout
    assert (tmp_path / "out" / "scores.csv").is_file() and (tmp_path / "out2" / "scores.csv").is_file()

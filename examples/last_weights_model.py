"""A training run's last-epoch weights as a model folder (the ablation scripts do not choose an epoch).

    python examples/last_weights_model.py RUN OUT
"""

import shutil
import sys
from pathlib import Path

from dermtool.modelio import save_model_folder

run, out = Path(sys.argv[1]), Path(sys.argv[2])
last = out.with_name("last-" + out.name)
shutil.rmtree(last, ignore_errors=True)
last.mkdir()
for name in ("config.json", "state.json"):
    shutil.copy(run / name, last / name)
shutil.copy(run / "last.weights.h5", last / "best.weights.h5")
save_model_folder(last, out)
shutil.rmtree(last)

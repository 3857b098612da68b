"""A training run's last-epoch weights as a model folder (the ablation scripts do not choose an epoch).

    python examples/last_weights_model.py RUN OUT
"""

import shutil
import sys
from pathlib import Path

from dermtool.errors import InputError
from dermtool.modelio import save_model_folder

if len(sys.argv) != 3:
    sys.exit("usage: python examples/last_weights_model.py RUN OUT")
run, out = Path(sys.argv[1]), Path(sys.argv[2])
needed = ("config.json", "state.json", "last.weights.h5")
missing = [name for name in needed if not (run / name).is_file()]
if missing:
    sys.exit(f"{run}: not a finished dermtool train run folder (no {', '.join(missing)}).")
last = out.with_name("last-" + out.name)
shutil.rmtree(last, ignore_errors=True)
last.mkdir(parents=True)
try:
    for name in ("config.json", "state.json"):
        shutil.copy(run / name, last / name)
    shutil.copy(run / "last.weights.h5", last / "best.weights.h5")
    save_model_folder(last, out)
except InputError as exc:
    sys.exit(str(exc).replace(str(last), str(run)))  # name the run's file, not the staging copy
finally:
    shutil.rmtree(last)

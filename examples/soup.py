"""Average the weights of model folders fine-tuned from one another (a uniform "model soup").

    python examples/soup.py OUT MODEL MODEL [MODEL ...]

Every weight, batch-norm statistics included, becomes the mean over the models; the first
model's config.json is kept. The models must share the architecture: their config.json model
sections may differ only in the calibration and the lesion view. The paper (Wortsman et al.,
"Model soups", ICML 2022) averages models fine-tuned from one starting point; the model card
("A soup of the last two models") measured it on two models of one fine-tuning path. The soup's
temperature is reset to 1 and its melanoma threshold removed, since they were fitted for
another network: run `dermtool calibrate` on its validation predictions before using labels.
"""

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np

from dermtool.config import load_config, save_config
from dermtool.ensemble import NOT_ARCHITECTURE  # what a config.json may differ in: fitted per network
from dermtool.errors import InputError

if len(sys.argv) < 4:
    sys.exit("usage: python examples/soup.py OUT MODEL MODEL [MODEL ...]")
out, models = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
if out.exists() and (not out.is_dir() or any(out.iterdir())):
    # an old best.weights.h5 or litert/ export there would be taken for the soup's
    sys.exit(f"{out}: already exists and is not an empty folder; name a new one for the soup.")
try:
    configs = [load_config(m) for m in models]
    sections = [{k: v for k, v in raw["model"].items() if k not in NOT_ARCHITECTURE} for _, _, raw in configs]
    for model, section in zip(models[1:], sections[1:]):
        if section != sections[0]:
            keys = sorted(k for k in section.keys() | sections[0].keys()
                          if section.get(k) != sections[0].get(k))
            sys.exit(f"{model}: its config.json differs from {models[0]}'s in {', '.join(keys)}; "
                     "only models of one architecture can be averaged.")
    from dermtool.modelio import load_model  # TensorFlow loads only once the configs agree

    nets = [load_model(m)[0] for m in models]
except InputError as exc:
    sys.exit(str(exc))
weights = [net.get_weights() for net in nets]
soup = [np.mean([w[i].astype(np.float64) for w in weights], axis=0).astype(weights[0][i].dtype)
        if np.issubdtype(weights[0][i].dtype, np.floating) else weights[0][i]  # counters stay the first's
        for i in range(len(weights[0]))]
nets[0].set_weights(soup)
cfg, tcfg, _ = configs[0]
cfg = dataclasses.replace(cfg, temperature=1.0, melanoma_threshold=None, calibration=None)
staging = out.with_name(out.name + ".partial")  # OUT appears whole or not at all
shutil.rmtree(staging, ignore_errors=True)
staging.mkdir(parents=True)
nets[0].save_weights(str(staging / "model.weights.h5"))
save_config(staging / "config.json", cfg, tcfg, soup_of=[str(m) for m in models])
if out.exists():
    out.rmdir()  # empty, checked above
staging.rename(out)
print(f"{out}: the mean of {len(models)} models' weights; calibrate it before using its labels.")

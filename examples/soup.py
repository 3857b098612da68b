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
import sys
from pathlib import Path

import numpy as np

from dermtool.config import load_config, save_config
from dermtool.errors import InputError

# fitted per network, or an inference setting (infer --cls-views): not the architecture
NOT_ARCHITECTURE = {"temperature", "melanoma_threshold", "calibration", "cls_views"}

if len(sys.argv) < 4:
    sys.exit("usage: python examples/soup.py OUT MODEL MODEL [MODEL ...]")
out, models = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
try:
    configs = [load_config(m) for m in models]
    sections = [{k: v for k, v in raw["model"].items() if k not in NOT_ARCHITECTURE} for _, _, raw in configs]
    for model, section in zip(models[1:], sections[1:]):
        if section != sections[0]:
            keys = sorted(k for k in section.keys() | sections[0].keys()
                          if section.get(k) != sections[0].get(k))
            sys.exit(f"{model}: its config.json differs from {models[0]}'s in {', '.join(keys)}; "
                     "only models of one architecture can be averaged.")
    from dermtool.modelio import load_model

    nets = [load_model(m)[0] for m in models]
except InputError as exc:
    sys.exit(str(exc))
weights = [net.get_weights() for net in nets]
soup = [np.mean([w[i].astype(np.float64) for w in weights], axis=0).astype(weights[0][i].dtype)
        for i in range(len(weights[0]))]
nets[0].set_weights(soup)
cfg, tcfg, raw = configs[0]
cfg = dataclasses.replace(cfg, temperature=1.0, melanoma_threshold=None, calibration=None)
out.mkdir(parents=True, exist_ok=True)
nets[0].save_weights(str(out / "model.weights.h5"))
save_config(out / "config.json", cfg, tcfg, soup_of=[str(m) for m in models])
print(f"{out}: the mean of {len(models)} models' weights; calibrate it before using its labels.")

"""Tiny random-weight models, built offline in the real on-disk formats.

No machine we test on reaches a model hub, so every model the pipeline can load has a tiny twin here:
same classes, same `save_pretrained` layout, same tokenizer files, random weights. Stages load them
through exactly the code path a real checkpoint takes; `zoo:NAME` in a config resolves to the built
folder. Outputs are noise by design: tests check plumbing, never quality.

`build(name, scale="paper", device="cuda")` builds the paper's four models (sd3, image-reward, armorm, lvlm-llava)
at their released shapes, vocabulary sizes and dtypes instead, random weights made directly on the device, from the
released configs in paper_configs/; `layers=N` caps every stack's depth for tests. They go to `NAME-paper[-LN]`.

Models are built once per (name, seed) into the zoo folder (``$SYNTHALIGN_ZOO`` or
``~/.cache/synthalign/zoo``) and reused; `synthalign zoo build --force` rebuilds them. A build writes to
a temporary folder and renames it into place, so a killed build never leaves a half model behind.

One module per model family registers its builders: `image` (diffusion, CLIP, BLIP, ImageReward),
`language` (LLaVA answerers, chat LM, reward model), `armorm` (the paper's reward model).
"""

from synthalign_ray.zoo import armorm, image, language  # noqa: F401  (each registers its builders)
from synthalign_ray.zoo.image import wordpiece_vocab, write_wordpiece_vocab
from synthalign_ray.zoo.registry import (
    BUILDERS,
    CORPUS,
    DEFAULT_SEED,
    PAPER_BUILDERS,
    PAPER_CONFIGS,
    SCALES,
    ZOO_PREFIX,
    ZooError,
    build,
    build_all,
    is_built,
    model_dir,
    register,
    resolve,
    zoo_root,
)

__all__ = [
    "BUILDERS",
    "CORPUS",
    "DEFAULT_SEED",
    "PAPER_BUILDERS",
    "PAPER_CONFIGS",
    "SCALES",
    "ZOO_PREFIX",
    "ZooError",
    "build",
    "build_all",
    "is_built",
    "model_dir",
    "register",
    "resolve",
    "wordpiece_vocab",
    "write_wordpiece_vocab",
    "zoo_root",
]

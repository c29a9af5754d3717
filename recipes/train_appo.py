"""Train a tool-using agent with APPO: one script for every recipe under recipes/.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/train_appo.py --config recipes/qwen2.5-7b-instruct/qlora.yaml [--field value ...]

    python recipes/train_appo.py --config recipes/cpu/demo.yaml          # tiny CPU run, no GPU, no downloads

A thin wrapper: the wiring lives in `trl_appo.scripts` (shared with `trl-appo train`, which works the same from
any directory: `trl-appo train --config cpu/demo.yaml`, and `accelerate launch -m trl_appo.scripts ...`).
Every YAML key is a field of `APPOScriptArguments`, `trl_appo.APPOConfig` or `trl.ModelConfig`, parsed by
`trl.TrlParser`; `python recipes/train_appo.py --help` lists them all. Bad input exits 2 with one line.
"""

import sys

from trl_appo.scripts import (  # noqa: F401 - re-exported for `import train_appo` users and tests
    REWARD_FUNCS,
    TINY_MODEL,
    TOOLS,
    APPOScriptArguments,
    Recipe,
    RecipeError,
    build_datasets,
    build_from_args,
    build_model,
    build_reward_funcs,
    build_tools,
    make_parser,
    parse_args,
)
from trl_appo.scripts import main as _cli_main
from trl_appo.scripts import train as main  # returns the trainer, raises RecipeError (as before)

if __name__ == "__main__":
    sys.exit(_cli_main(prog="train_appo.py"))

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

# The wiring is imported on first use, so that what third-party packages print while TRL is imported is held back
# with the rest of the setup (one line on bad input; see trl_appo.runtime.held_stderr).
_EXPORTS = {"REWARD_FUNCS", "TINY_MODEL", "TOOLS", "APPOScriptArguments", "Recipe", "RecipeError", "build_datasets",
            "build_from_args", "build_model", "build_reward_funcs", "build_tools", "make_parser", "parse_args"}


def __getattr__(name):
    """`import train_appo` users and tests: the names of `trl_appo.scripts`, and `main` = `scripts.train` (returns
    the trainer, raises RecipeError), as before."""
    if name == "main" or name in _EXPORTS:
        from trl_appo import scripts

        return scripts.train if name == "main" else getattr(scripts, name)
    raise AttributeError(name)


if __name__ == "__main__":
    from trl_appo.cli import train_script_main

    sys.exit(train_script_main(prog="train_appo.py"))

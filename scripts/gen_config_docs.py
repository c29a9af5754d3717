"""Regenerate docs/config.md from APPOConfig's field metadata (the help text is the single source).

    python scripts/gen_config_docs.py          # write docs/config.md
    python scripts/gen_config_docs.py --check  # fail if docs/config.md is stale (used by the tests)
"""

import sys
from dataclasses import MISSING, fields
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def render() -> str:
    from trl import GRPOConfig

    from trl_appo.config import APPOConfig

    grpo = {f.name: f for f in fields(GRPOConfig)}
    lines = [
        "# APPOConfig fields",
        "",
        "Generated from `trl_appo/config.py` by `scripts/gen_config_docs.py`; do not edit by hand.",
        "`APPOConfig` accepts every [`GRPOConfig`](https://huggingface.co/docs/trl/grpo_trainer) field; below are",
        "the fields APPO adds and the GRPO defaults it changes.",
        "",
        "| field | default | meaning |",
        "|---|---|---|",
    ]
    for f in fields(APPOConfig):
        changed = f.name in grpo and grpo[f.name].default != f.default
        if f.name in grpo and not changed:
            continue
        default = f.default if f.default is not MISSING else "(required)"
        help_text = f.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
        note = f" *(GRPO default: `{grpo[f.name].default}`)*" if changed else ""
        lines.append(f"| `{f.name}` | `{default}` | {help_text}{note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            sys.exit("docs/config.md is stale: run python scripts/gen_config_docs.py")
    else:
        OUT.write_text(text)
        print(f"wrote {OUT}")

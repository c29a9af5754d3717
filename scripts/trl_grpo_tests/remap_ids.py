# Part of scripts/trl_grpo_tests (see run.sh): offline stand-ins, not a test of this repository.
"""Rewrite the Qwen token ids hard-coded in TRL's scripted completions into the stand-in tokenizer's compact ids.
Only integer lists that contain a Qwen special-token id (151643-151668) are touched."""
import json, re, sys
m = {int(k): v for k, v in json.load(open(sys.argv[1])).items()}
src = open(sys.argv[2]).read()
def fix(match):
    nums = [int(x) for x in re.findall(r"\d+", match.group(0))]
    if not any(151643 <= n <= 151668 for n in nums):
        return match.group(0)
    missing = [n for n in nums if n not in m]
    if missing:
        sys.stderr.write(f"unmapped ids {missing}\n")
        return match.group(0)
    return "[" + ", ".join(str(m[n]) for n in nums) + "]"
out = re.sub(r"\[\s*\d+(?:\s*,\s*\d+)+\s*\]", fix, src)
open(sys.argv[3], "w").write(out)

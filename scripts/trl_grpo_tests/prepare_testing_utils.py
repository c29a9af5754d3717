"""Adapt TRL's tests/testing_utils.py and tests/conftest.py (copied, never committed) to this CPU-only offline
machine: `trl.import_utils` names this TRL lacks become "not available", jmespath-gated tests run (transformers >=
5.13 parses responses without it), and configs default to bf16=False on the CPU."""
import re
import sys

utils_src, utils_dst, conf_src, conf_dst = sys.argv[1:5]
s = open(utils_src).read()
start = s.index("from trl.import_utils import (")
old = s[start : s.index(")", start) + 1]
names = re.findall(r"is_\w+", old)
s = s.replace(old, "import trl.import_utils as _iu\n" + "\n".join(
    f"{n} = getattr(_iu, {n!r}, lambda: False)" for n in names))
s += '''
import transformers as _tf
from packaging.version import Version as _V
if _V(_tf.__version__) >= _V("5.13.0"):
    require_jmespath = pytest.mark.skipif(False, reason="")
'''
open(utils_dst, "w").write(s)
c = open(conf_src).read() + '''

import trl.trainer.base_config as _bc

_orig_post_init = _bc._BaseConfig.__post_init__


def _cpu_post_init(self):
    if not torch.cuda.is_available():
        if self.bf16 is None:
            self.bf16 = False
        self.use_cpu = True
    _orig_post_init(self)


_bc._BaseConfig.__post_init__ = _cpu_post_init
'''
open(conf_dst, "w").write(c)

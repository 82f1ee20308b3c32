"""`python -m neuroada_format ...` is the `neuroada` command (validate, inspect), for environments without the
console scripts on PATH."""
import sys

from ._entry import neuroada

sys.exit(neuroada())

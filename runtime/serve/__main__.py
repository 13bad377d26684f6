import runpy
import sys

print("note: `python -m runtime.serve` is now `python -m serving` (this pointer goes next release)", file=sys.stderr)
runpy.run_module("serving", run_name="__main__", alter_sys=True)

import runpy
import sys

print("note: `python -m export.profile` is now `python -m export.tensorrt.trtexec` (this pointer goes next release)", file=sys.stderr)
runpy.run_module("export.tensorrt.trtexec", run_name="__main__", alter_sys=True)

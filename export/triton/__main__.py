import runpy
import sys

print("note: `python -m export.triton` is now `python -m serving.write_repository` (this pointer goes next release)", file=sys.stderr)
runpy.run_module("serving.write_repository", run_name="__main__", alter_sys=True)

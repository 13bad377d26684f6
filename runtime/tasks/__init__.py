"""The tasks, peers over one Session (a loaded bundle): txt2img, img2img, inpaint, upscale.

Each is a function `task(pipe, prompt, ..., **sampling)` that draws its noise, builds its
conditioning and calls the session's one denoise loop; `runtime.Pipeline` carries them as methods.
"""

from .img2img import img2img
from .inpaint import inpaint
from .txt2img import txt2img
from .upscale import upscale

__all__ = ["txt2img", "img2img", "inpaint", "upscale"]

"""Reading an image file a user names: every way it can fail is one ValueError naming the file, the cause and the fix."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any


def open_image(path: Path, what: str) -> Any:
    """The decoded PIL image at `path`; `what` names the argument in the message (--image, --mask).

    Pictures past PIL's decompression-bomb limit (about 179 million pixels, e.g. 60000x60000: 10 GB decoded) are
    refused from their header, before a pixel is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns up to twice its limit
            with Image.open(path) as im:
                im.load()
                return im
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder, not an image file") from None
    except UnidentifiedImageError:
        raise ValueError(f"{what} {path} is not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found[1]):,} pixels" if found else "too many pixels"
        raise ValueError(
            f"{what} {path} has {size}, more than the {Image.MAX_IMAGE_PIXELS:,} an image may have here (a decompression "
            "bomb, or a photo far larger than any bundle): resize it to the bundle's size first"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL: truncated or corrupt data
        raise ValueError(f"{what} {path} could not be read ({e}); is the file complete?") from None

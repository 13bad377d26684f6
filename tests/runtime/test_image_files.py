"""Issue 28: an image file given to img2img / inpaint / upscale is read or refused in one line, bombs from the header."""

from __future__ import annotations

import struct
import zlib

import pytest

from runtime.image_files import open_image

pytestmark = pytest.mark.reliability


def png_header_only(path, width, height):
    """A PNG that declares width x height and holds one row of data: PIL reads its size from the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * 8))) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [60_000, 15_000])  # past PIL's error limit; between its warning and its error
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, side):
    path = png_header_only(tmp_path / "huge.png", side, side)
    with pytest.raises(ValueError, match=rf"--image {path} has {side * side:,} pixels, more than the [\d,]+ an image may have here"):
        open_image(path, "--image")


def test_the_runtime_cli_names_a_bomb_in_one_line(bundle_fp32, tmp_path, capsys):
    import runtime.cli

    path = png_header_only(tmp_path / "huge.png", 60_000, 60_000)
    code = runtime.cli.main(["img2img", "a cat", "--image", str(path), "--bundle", str(bundle_fp32), "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: --image {path} has 3,600,000,000 pixels")
    assert not (tmp_path / "o.png").exists()

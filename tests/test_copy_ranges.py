"""Many file pieces copied at once (a TP column slice is a piece per row): writev from shared mappings of
the sources gives the bytes of the pieces in order, across files, windows and page offsets, and the same
bytes when mapping is not the way the file systems take."""

import mmap
import zipfile
import zlib

import pytest
import torch

from mindformers_conv import outfile
from mindformers_conv.formats import torch_pickle
from mindformers_conv.synthetic import LlamaShape, write_llama
from mindformers_conv.tensor_ref import FileRanges, column_ranges


def random_file(path, n, seed):
    data = bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8))
    path.write_bytes(data)
    return data


@pytest.fixture
def sources(tmp_path):
    return {str(tmp_path / f"{k}.bin"): random_file(tmp_path / f"{k}.bin", 60_000 + 999 * k, k) for k in range(2)}


def pieces(sources):
    """Column pieces of both files interleaved (row r of a, then of b; b's matrix in two file ranges, so some
    pieces are two), one piece crossing a window, one empty."""
    (a, da), (b, db) = sources.items()
    rows = column_ranges(40, [(((a, 0, len(da)),), 1100, 17, 300),
                              (((b, 5, 19_300), (b, 19_305, len(db) - 19_305)), 1300, 901, 333)])
    assert len(rows) == 81 and rows[0] == (a, 17, 300) and rows[1] == (b, 906, 333)
    return rows + ((a, 3, 50_000), (b, 0, 0), (a, 59_990, 10))


def expected(sources, ranges):
    return b"".join(sources[path][offset:offset + length] for path, offset, length in ranges)


@pytest.mark.parametrize("mapped", [True, False])
def test_many_pieces_are_copied_in_order_across_files_and_windows(tmp_path, monkeypatch, sources, mapped):
    monkeypatch.setattr(outfile, "MAP_WINDOW", 4 * mmap.PAGESIZE)
    monkeypatch.setattr(outfile, "IOV_MAX", 7)
    monkeypatch.setattr(outfile, "MAP_WRITE_PIECE", 5000)
    if not mapped:
        monkeypatch.setattr(outfile, "KERNEL_COPIES", outfile.KERNEL_COPIES[1:])
    ranges = pieces(sources)
    out = outfile.OutputFile(tmp_path / "out.bin")
    out.write(b"xyz")
    FileRanges(ranges).write_to(out)
    assert out.position == 3 + sum(n for _, _, n in ranges)
    out.commit()
    assert (tmp_path / "out.bin").read_bytes() == b"xyz" + expected(sources, ranges)


def test_mapped_views_are_the_pieces_bytes_in_bounded_batches(monkeypatch, sources):
    monkeypatch.setattr(outfile, "MAP_WINDOW", 2 * mmap.PAGESIZE)
    monkeypatch.setattr(outfile, "IOV_MAX", 5)
    monkeypatch.setattr(outfile, "MAP_WRITE_PIECE", 3000)
    ranges = pieces(sources)
    parts = list(outfile.mapped_views(ranges))
    assert all(len(views) <= outfile.IOV_MAX and sum(map(len, views)) == n <= outfile.MAP_WRITE_PIECE
               for views, n in parts)
    assert b"".join(view for views, _ in parts for view in views) == expected(sources, ranges)


def test_a_piece_past_the_end_of_its_file_is_a_clear_error(tmp_path, sources):
    path = next(iter(sources))
    out = outfile.OutputFile(tmp_path / "out.bin")
    with pytest.raises(outfile.OutputError, match=r"0\.bin: unexpected end of file at byte 60000"):
        out.copy_ranges(((path, 0, 10), (path, 59_000, 2000)))
    out.abort()


@pytest.mark.parametrize("crc", ["isal", "zlib"])
def test_megatron_rank_files_are_valid_zips_with_crcs_of_their_bytes(cli, tmp_path, monkeypatch, crc):
    """The CRC-32 of every record is read back from the written bytes on a second thread (ISA-L's, or zlib's
    without it): testzip agrees."""
    from isal import isal_zlib

    assert torch_pickle.crc32 is isal_zlib.crc32  # installed with the package: the fast one is in use
    if crc == "zlib":
        monkeypatch.setattr(torch_pickle, "crc32", zlib.crc32)
    hf = write_llama(tmp_path / "hf", LlamaShape(num_hidden_layers=2))
    r = cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "mg", "--target", "megatron",
            "--tp", "2", "--llm_pp_layers", "1,1")
    assert r.code == 0, r.err
    files = sorted((tmp_path / "mg").glob("release/*/model_optim_rng.pt"))
    assert len(files) == 4
    for path in files:
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None

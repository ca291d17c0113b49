"""The TensorBoard writer produces files TensorBoard's own reader accepts."""

import pytest

from jlora.tbwriter import SummaryWriter, crc32c, read_scalars


def test_crc32c_known_vector():
    assert crc32c(b"123456789") == 0xE3069283


def test_scalars_round_trip_and_tensorboard_reads_them(tmp_path):
    w = SummaryWriter(str(tmp_path))
    w.scalars(3, {"train/loss": 2.5, "eval/perplexity": 12.25})
    w.scalars(7, {"train/loss": 1.5})
    w.close()
    assert list(read_scalars(w.path)) == [(3, "train/loss", 2.5), (3, "eval/perplexity", 12.25), (7, "train/loss", 1.5)]
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    ea = ea_mod.EventAccumulator(str(tmp_path))
    ea.Reload()
    assert sorted(ea.Tags()["scalars"]) == ["eval/perplexity", "train/loss"]
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(3, 2.5), (7, 1.5)]


def test_corrupt_file_is_reported(tmp_path):
    w = SummaryWriter(str(tmp_path))
    w.scalars(1, {"a": 1.0})
    w.close()
    data = bytearray(open(w.path, "rb").read())
    data[-6] ^= 0xFF
    open(w.path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="corrupt event record"):
        list(read_scalars(w.path))

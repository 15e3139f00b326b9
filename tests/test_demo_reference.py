"""The reference demo runs end to end at a reduced size and writes its timeline."""

from dcpp.demo_reference import main


def test_demo_reference_small(tmp_path, capsys):
    assert main(["--seq-len", "160", "--out", str(tmp_path / "tl")]) == 0
    out = capsys.readouterr().out
    assert "parity OK" in out and "static plan [40, 40, 40, 40]" in out
    assert (tmp_path / "tl.png").stat().st_size > 1000 and (tmp_path / "tl.svg").exists()

"""The `1bit` command line: streaming run, info, convert, and one-line errors with non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from onebit.cli import main
from subprocess_env import checkout_env


def test_run_streams_greedy_text(capsys):
    assert main(["run", "tiny-random", "-p", "Hello", "-n", "8", "-t", "0", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    import onebit

    m = onebit.load("tiny-random", backend="numpy")
    expected = "".join(m.generate("Hello", max_tokens=8, temperature=0.0))
    assert out == "Hello" + expected + "\n"


def test_run_reads_stdin(monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("From stdin"))
    assert main(["run", "tiny-random", "-n", "2", "-t", "0", "--backend", "numpy"]) == 0
    assert capsys.readouterr().out.startswith("From stdin")


def test_info_json(capsys):
    assert main(["info", "tiny-random", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["architecture"] == "bitnet" and d["layers"] == 2 and d["vocab_size"] == 260
    per_layer = 256 * 256 + 2 * 128 * 256 + 256 * 256 + 3 * 256 * 512  # q, k+v (2 KV heads), o, mlp
    assert d["ternary_parameters"] == 2 * per_layer
    assert d["tokenizer"]["chat_template"] is True


@pytest.mark.parametrize("args,needle", [
    (["run", "/no/such/model", "-p", "x"], "no such file"),
    (["run", "tiny-random", "-p", "x", "--temperature", "-1", "--backend", "numpy"], "temperature"),
    (["run", "tiny-random", "-p", "x", "-n", "0", "--backend", "numpy"], "max-tokens"),
    (["info", "/no/such/model"], "no such file"),
])
def test_errors_are_one_line(capsys, args, needle):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_gguf_via_entry_point(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 10)
    p = subprocess.run([sys.executable, "-m", "onebit.cli", "info", str(bad)], capture_output=True, text=True,
                       env=checkout_env())
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and str(bad) in p.stderr and p.stderr.count("\n") == 1


def test_import_onebit_does_not_import_torch_or_web_stack():
    code = ("import sys, onebit, onebit.cli; onebit.cli.build_parser(); "
            "bad = [m for m in ('torch', 'fastapi', 'uvicorn', 'transformers') if m in sys.modules]; print(bad)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("run", "chat", "info", "convert", "synth"):
        assert cmd in out


def test_chat_over_stdin(monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nagain\n"))
    assert main(["chat", "tiny-random", "-n", "4", "-t", "0", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2  # one reply line per user turn


def test_missing_tokenizer_is_one_line(tmp_path, capsys):
    import hf_oracle as H

    H.write_bitnet_packed(str(tmp_path), H.bitnet_config(), "autobitlinear")
    assert main(["run", str(tmp_path), "-p", "x", "--backend", "numpy"]) == 1
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and str(tmp_path) in err and err.count("\n") == 1


def test_info_on_gguf_and_lm_head_option(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["synth", "tiny-random", str(out)]) == 0
    assert "wrote tiny-random" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "gguf" and d["architecture"] == "bitnet" and d["vocab_size"] == 260
    assert main(["run", str(out), "-p", "Hi", "-n", "3", "-t", "0", "--lm-head", "int8", "--backend", "numpy"]) == 0
    assert main(["run", str(out), "-p", "Hi", "-n", "3", "-t", "0", "--kv-dtype", "f32", "--backend", "numpy"]) == 0

"""`florence2 doctor` through CliRunner and through the installed entry point."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from florence2_serve.client.cli import cli


def test_doctor_json_reports_versions_and_flash_attn():
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["torch"] and report["transformers"] and report["python"]
    assert report["flash_attn"]["status"] in ("real", "shim", "absent")
    assert report["can_run"]["native"]["ok"] is True
    assert "legacy" in report["can_run"]["remote"]["advice"]
    assert report["ok"] is True


def test_doctor_with_model_loads_and_generates(tiny_model_dir):
    result = CliRunner().invoke(cli, ["doctor", "--json", "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["model"]
    assert model["kind"] == "native" and model["random_weights"] is True
    assert model["boxes"] == 4 and model["load_seconds"] >= 0 and model["generate_ms"] > 0


def test_doctor_exits_nonzero_when_model_is_broken(tmp_path):
    result = CliRunner().invoke(cli, ["doctor", "--model", str(tmp_path)])
    assert result.exit_code == 1
    assert "PROBLEM" in result.stdout and "BROKEN" in result.stdout


def test_real_entry_point_doctor_text():
    beside_python = Path(sys.executable).parent / "florence2"
    exe = str(beside_python) if beside_python.exists() else shutil.which("florence2")
    assert exe, "the florence2 console script is installed"
    result = subprocess.run([exe, "doctor"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "flash_attn" in result.stdout and result.stdout.strip().endswith("OK")

"""Serving the dot model needs numpy, SQLAlchemy and click only: no torch, no fastai, no pandas."""
from __future__ import annotations

import json
import subprocess
import sys



def test_serving_commands_import_no_training_framework(trained, db_url, tmp_path):
    answers = tmp_path / "q.json"
    answers.write_text(json.dumps({"user": "fresh", "answers": {"gender": "F"}, "ratings": {"a1": 5}}))
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("user,item\na0,a1\n")
    script = f"""
import sys
from click.testing import CliRunner
from cfb.cli.main import cli
runs = [["recommend", "a0"], ["similar", "a1"], ["onboard", "--answers", {str(answers)!r}],
        ["predict", "--pairs", {str(pairs)!r}], ["questionnaire"], ["recommend", "fresh"]]
for args in runs:
    res = CliRunner().invoke(cli, ["--db", {db_url!r}, *args])
    assert res.exit_code == 0, (args, res.output)
print(sorted(m for m in ("torch", "fastai", "pandas", "sklearn") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
